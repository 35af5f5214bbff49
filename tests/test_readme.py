"""The README cannot rot: every command it shows is one the code accepts, and its line counts are true."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md')).read()


def commands():
    """Every python/torchrun command in the README's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    cmds = []
    for line in lines:
        for part in line.split("&&"):
            words = part.split("#")[0].split()
            if words and words[0] in ("python", "torchrun"):
                cmds.append(words)
    return cmds


def help_text(script):
    """--help of a script, or of a module (perf.speed) run with -m"""
    cmd = [script] if script.endswith('.py') else ['-m', script]
    return subprocess.run([sys.executable, *cmd, '--help'], cwd=ROOT, capture_output=True, text=True).stdout


def test_readme_commands_are_accepted():
    cmds = commands()
    assert any(c[:2] == ['python', 'train.py'] for c in cmds) and any(c[:2] == ['torchrun', '--nproc_per_node=8'] for c in cmds)
    helps = {}
    for words in cmds:
        script = next(w for w in words if w.endswith('.py') or w == '-m')
        if script == '-m':
            script = words[words.index('-m') + 1]
            if script in ('pytest', 'venv'):
                continue
            assert os.path.isfile(os.path.join(ROOT, *script.split('.')) + '.py'), script
        else:
            assert os.path.isfile(os.path.join(ROOT, script)), script
        args = words[words.index(script) + 1:]
        helps.setdefault(script, help_text(script))
        for a in args:
            if a.startswith('--'):
                key = a[2:].split('=')[0]
                assert f'--{key}' in helps[script], f"README: {' '.join(words)}: {script} has no --{key}"
            elif a.startswith('config/'):
                assert os.path.isfile(os.path.join(ROOT, a)), f"README: {a} does not exist"


def test_readme_line_counts():
    for name, count in re.findall(r"\| `(\w+\.py)` \| (\d+) \|", README):
        with open(os.path.join(ROOT, name)) as f:
            assert sum(1 for line in f if line.strip()) == int(count), name
    assert len(re.findall(r"\| `(\w+\.py)` \| (\d+) \|", README)) == 7


BUDGETS = {'model.py': 800, 'data.py': 650, 'bench.py': 450, 'train.py': 450, 'sample.py': 320, 'dpo.py': 140,
           'configurator.py': 80}


def test_the_seven_files_are_the_lesson():
    """The seven top-level files stay within their budgets (non-blank lines), 2,600 together, and no other
    top-level script joins them: what a student may skip lives in a folder."""
    counts = {}
    for name, budget in BUDGETS.items():
        with open(os.path.join(ROOT, name)) as f:
            counts[name] = sum(1 for line in f if line.strip())
        assert counts[name] <= budget, (name, counts[name], budget)
    assert sum(counts.values()) <= 2600, counts
    assert sorted(f for f in os.listdir(ROOT) if f.endswith('.py')) == sorted(BUDGETS)
