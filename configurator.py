"""
`--key=value` command-line overrides for the dataclass configs of every script (nanoGPT's configurator, as an
importable function instead of an `exec`).

    @dataclass
    class Config:
        lr: float = 3e-4        # peak learning rate
        dataset: str = 'shapes'

    cfg = configure(Config(), sys.argv[1:])     # python train.py --lr=1e-3 --dataset=imagenet

Values are parsed as Python literals (`--lr=1e-3`, `--betas=(0.9,0.95)`, `--compile=True`); anything that is not a
literal is kept as a string (`--dataset=imagenet`). Each value is checked against the field's declared type; an
unknown key or a wrong type raises ConfigError with the list of valid keys, so a typo never trains silently with a
default. `--help` prints the keys with their defaults.
"""
import ast
import dataclasses
import types
import typing


class ConfigError(ValueError):
    """A bad command-line override: unknown key, wrong type, or malformed argument."""


def _accepts(tp, value):
    """Whether `value` fits the declared type `tp` (bool is not an int here, an int is a float)."""
    if tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:  # tuple[float, float], list[int], dict[...]: check the container only
        return isinstance(value, origin)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as `imagenet` is a string


def describe(config):
    """One line per field: `key = default  (type)`."""
    hints = typing.get_type_hints(type(config))
    return '\n'.join(f'  --{f.name}={getattr(config, f.name)!r}  ({getattr(hints[f.name], "__name__", hints[f.name])})'
                     for f in dataclasses.fields(config))


def _split_args(argv, valid):
    """Yield (key, text) from `--key=value` and `--key value` arguments."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ('-h', '--help'):
            yield arg, None
        elif arg.startswith('--') and '=' in arg:
            key, text = arg[2:].split('=', 1)
            yield key.replace('-', '_'), text
        elif arg.startswith('--') and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
            yield arg[2:].replace('-', '_'), argv[i + 1]
            i += 1
        else:
            raise ConfigError(f'bad argument {arg!r}: expected --key=value. Valid keys: {", ".join(valid)}')
        i += 1


def configure(config, argv):
    """Return a copy of the dataclass `config` with `--key=value` (or `--key value`) overrides from `argv` applied.

    A field typed `str` takes the text as it is (so `--prompt "1 red circle"` stays a string). A field typed
    `list[str]` collects repeated flags: `--prompt "a" --prompt "b"` gives ['a', 'b'].
    """
    hints = typing.get_type_hints(type(config))
    valid = [f.name for f in dataclasses.fields(config)]
    updates = {}
    for key, text in _split_args(argv, valid):
        if text is None:
            print(f'{type(config).__name__} keys (override with --key=value):\n{describe(config)}')
            raise SystemExit(0)
        if key not in valid:
            raise ConfigError(f'unknown config key {key!r}. Valid keys: {", ".join(valid)}')
        tp = hints[key]
        if tp is str:
            value = text
        elif tp == list[str] and not text.startswith('['):
            value = updates.get(key, []) + [text]
        else:
            value = _parse_value(text)
            if isinstance(value, (list, tuple)) and typing.get_origin(tp) in (tuple, list):
                value = typing.get_origin(tp)(value)
        if not _accepts(tp, value):
            raise ConfigError(f'config key {key!r} expects {getattr(tp, "__name__", tp)}, got {text!r} '
                              f'({type(value).__name__}); default is {getattr(config, key)!r}')
        if tp is float and isinstance(value, int):
            value = float(value)
        updates[key] = value
    return dataclasses.replace(config, **updates)


def config_from_dict(cls, d):
    """Rebuild a dataclass from a plain dict (e.g. a checkpoint's config), rejecting unknown keys."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ConfigError(f'unknown {cls.__name__} keys {unknown}; valid keys: {sorted(valid)}')
    return cls(**d)
