"""configurator.py: config file, then --key=value / --key value overrides, typed by the defaults."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
batch_size = 4
learning_rate = 3e-4
out_dir = 'out'
compile = False
exec(open(%r).read())
print('RESULT', repr((batch_size, learning_rate, out_dir, compile)))
""" % os.path.join(ROOT, 'configurator.py')


def run(tmp_path, *args):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)


def result(proc):
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout.split('RESULT ')[1])


def test_overrides_and_types(tmp_path):
    (tmp_path / 'cfg.py').write_text("batch_size = 8\nout_dir = 'out-cfg'\n")
    r = result(run(tmp_path, 'cfg.py', '--learning_rate=1', '--compile', 'True', '--batch_size=16'))
    assert r == (16, 1.0, 'out-cfg', True)
    assert isinstance(r[1], float)  # an int is accepted for a float
    assert result(run(tmp_path, '--out_dir=2024'))[2] == '2024'  # strings stay strings


def test_errors_and_help(tmp_path):
    p = run(tmp_path, '--batch_sise=3')
    assert p.returncode != 0 and '--batch_size' in p.stderr  # names the closest key
    p = run(tmp_path, '--compile=yes')
    assert p.returncode != 0 and 'True or False' in p.stderr
    p = run(tmp_path, '--batch_size=abc')
    assert p.returncode != 0 and 'expects int' in p.stderr
    p = run(tmp_path, '--help')
    assert p.returncode == 0 and '--learning_rate=0.0003' in p.stdout and '--out_dir=' in p.stdout
