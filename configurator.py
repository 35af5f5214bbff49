"""
nanoGPT-style config overrides. A script keeps its defaults as module-level
globals and then does

    exec(open('configurator.py').read())

which runs an optional config file (first argument without '--') and then
applies --key=value or --key value overrides to those globals:

    python train.py config/stage2_135m.py --batch_size=8 --compile True

Values go through ast.literal_eval, so 3e-4, True, (1, 2) and 'abc' work; a
value that is not a Python literal stays a string. An int is accepted for a
float. --help prints every key with its default.
"""
import ast
import difflib
import sys

_types = (int, float, bool, str, tuple, list, dict, type(None))
_known = {k: v for k, v in globals().items()  # UPPER_CASE names are constants, not keys
          if not k.startswith('_') and not k.isupper() and isinstance(v, _types)}


def _set(key, raw):
    if key not in _known:
        close = difflib.get_close_matches(key, list(_known), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join('--' + c for c in close)}?" if close else ""
        sys.exit(f"configurator: unknown config key --{key}.{hint} (--help lists all keys)")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as --device=cpu stays a string
    default = globals()[key]
    if isinstance(default, bool) and not isinstance(value, bool):
        sys.exit(f"configurator: --{key} takes True or False, got {raw!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (default is not None and not isinstance(value, type(default))
            and not isinstance(default, str)):
        sys.exit(f"configurator: --{key} expects {type(default).__name__} (default {default!r}), "
                 f"got {raw!r}")
    if isinstance(default, str):  # strings stay strings: --out_dir=2024 is '2024'
        value = raw if not isinstance(value, str) else value
    print(f"override: {key} = {value!r}")
    globals()[key] = value


_args = sys.argv[1:]
if '--help' in _args or '-h' in _args:
    print(f"usage: python {sys.argv[0]} [config/file.py] [--key=value ...]\n\nkeys and defaults:")
    for _k, _v in _known.items():
        print(f"  --{_k}={_v!r}")
    sys.exit(0)
_i = 0
while _i < len(_args):
    _a = _args[_i]
    if not _a.startswith('--'):
        if _i != 0:
            sys.exit(f"configurator: a config file must come first, got {_a!r} after overrides")
        try:
            _src = open(_a).read()
        except OSError as e:
            sys.exit(f"configurator: cannot read config file {_a}: {e.strerror}")
        print(f"config file: {_a}")
        _cfg = {}
        exec(_src, {}, _cfg)
        for _k, _v in _cfg.items():
            if not _k.startswith('_') and not callable(_v) and type(_v).__name__ != 'module':
                _set(_k, repr(_v))
    elif '=' in _a:
        _set(*_a[2:].split('=', 1))
    else:
        if _i + 1 >= len(_args):
            sys.exit(f"configurator: --{_a[2:]} needs a value")
        _set(_a[2:], _args[_i + 1])
        _i += 1
    _i += 1
