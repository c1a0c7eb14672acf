from dataclasses import dataclass, field

import pytest

from configurator import configure, config_from_dict, ConfigError


@dataclass
class Cfg:
    lr: float = 3e-4
    max_iters: int = 100
    dataset: str = 'shapes'
    compile: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    init: str | None = None
    prompt: list[str] = field(default_factory=list)


def test_good_values_are_parsed_and_typed():
    """--key=value overrides become Python values of the field's type."""
    cfg = configure(Cfg(), ['--lr=1e-3', '--max_iters=7', '--dataset=imagenet', '--compile=True',
                            '--betas=(0.8,0.99)', '--init=resume'])
    assert cfg == Cfg(lr=1e-3, max_iters=7, dataset='imagenet', compile=True, betas=(0.8, 0.99), init='resume')


def test_int_is_accepted_for_float_and_stored_as_float():
    """--lr=1 is a float field's 1.0, not an error and not an int."""
    cfg = configure(Cfg(), ['--lr=1'])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_space_separated_and_repeated_list_flags():
    """--key value works, and repeated flags of a list field collect (several --prompt)."""
    cfg = configure(Cfg(), ['--prompt', 'a red circle', '--prompt=42', '--dataset', '7'])
    assert cfg.prompt == ['a red circle', '42']
    assert cfg.dataset == '7'  # a str field keeps the text as given, even when it looks like a number


def test_defaults_untouched_and_original_not_mutated():
    """configure returns a copy: defaults stay what they are for the next caller."""
    base = Cfg()
    cfg = configure(base, ['--max_iters=5'])
    assert base.max_iters == 100 and cfg.max_iters == 5 and cfg.lr == base.lr


def test_unknown_key_is_rejected_with_valid_keys_listed():
    """A typo never trains silently with a default: the valid keys are listed."""
    with pytest.raises(ConfigError) as e:
        configure(Cfg(), ['--learning_rate=1e-3'])
    assert "'learning_rate'" in str(e.value) and 'max_iters' in str(e.value)


@pytest.mark.parametrize('arg, key', [('--max_iters=1.5', 'max_iters'), ('--lr=fast', 'lr'),
                                      ('--compile=1', 'compile'), ('--max_iters=True', 'max_iters')])
def test_wrong_type_is_rejected_naming_the_key(arg, key):
    """A value of the wrong type names the key and its default."""
    with pytest.raises(ConfigError) as e:
        configure(Cfg(), [arg])
    assert repr(key) in str(e.value)


def test_malformed_argument():
    """An argument that is not --key=value is an error, not ignored."""
    with pytest.raises(ConfigError):
        configure(Cfg(), ['max_iters=3'])


def test_config_from_dict_round_trip_and_unknown_keys():
    """A checkpoint's config dict rebuilds the dataclass, and unknown keys are refused."""
    import dataclasses
    cfg = Cfg(lr=0.1)
    assert config_from_dict(Cfg, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ConfigError):
        config_from_dict(Cfg, {'lr': 0.1, 'bogus': 1})
