"""Tests for synthgen.config: defaults, strict keys and types, typed overrides, immutability."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from synthgen.config import Config, ConfigError, config_to_dict, load_config

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _leaves(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def test_defaults_and_repo_params_load():
    assert load_config(None) == Config()
    config = load_config(PARAMS)
    # every value written in params.yaml is the value the stages get (none dropped, coerced or defaulted)
    loaded = dict(_leaves(config_to_dict(config)))
    written = dict(_leaves(yaml.safe_load(PARAMS.read_text())))
    assert {key: (value, loaded.get(key, "<missing>")) for key, value in written.items() if loaded.get(key, "<missing>") != value} == {}
    assert config.data.source == "digits-long-tail" and config.data.test_source == "digits-long-tail-test"
    # every section round-trips through its plain-JSON form
    assert Config.model_validate(config_to_dict(config)) == config


def test_unknown_key_rejected_with_dotted_name(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("filter:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"filter\.bogus"):
        load_config(params)
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(None, ["train.stepz=3"])


def test_wrong_type_rejected_naming_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=rf"{params}[\s\S]*train\.steps"):
        load_config(params)
    with pytest.raises(ConfigError, match=r"data\.val_per_class"):
        load_config(None, ["data.val_per_class=-1"])
    with pytest.raises(ConfigError, match=r"filter\.write_workers"):
        load_config(None, ["filter.write_workers=0"])
    assert load_config(None, ["filter.write_workers=4"]).filter.write_workers == 4


def test_overrides_are_typed():
    config = load_config(
        PARAMS,
        ["train.steps=100", "data.per_class=null", "filter.novelty=false", "filter.novelty_threshold=0.3",
         "data.long_tail={max: 20, ratio: 10}", "data.source=some/dir"],
    )
    assert config.train.steps == 100 and isinstance(config.train.steps, int)
    assert config.data.per_class is None and config.filter.novelty is False
    assert config.filter.novelty_threshold == pytest.approx(0.3)
    assert config.data.long_tail.max == 20 and config.data.long_tail.ratio == 10.0
    assert config.data.source == "some/dir"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        load_config(PARAMS, ["train.steps.x=1"])


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(ValidationError):
        config.train.steps = 5
    with pytest.raises(ValidationError):
        config.data = None


def test_per_class_and_long_tail_exclusive():
    with pytest.raises(ConfigError, match="per_class and data.long_tail are exclusive"):
        load_config(None, ["data.per_class=20", "data.long_tail={max: 20, ratio: 10}"])


def test_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_params_yaml_departs_from_the_config_defaults_only_for_the_demo_split():
    """Defaults live in config.py; params.yaml is the demo project's settings. The only keys it may set
    differently are the demo's built-in sources (everything else would be a second, drifting copy of a
    default, and a user who points data.source at a folder inherits no cut of it)."""
    import yaml

    from synthgen.config import config_to_dict

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    defaults = config_to_dict(Config())

    def differences(left, right, prefix=""):
        for key in sorted(set(left) | set(right)):
            a, b = left.get(key), right.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                yield from differences(a, b, f"{prefix}{key}.")
            elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                yield f"{prefix}{key}"

    assert set(differences(shipped, defaults)) == {"data.source", "data.test_source"}


def test_a_key_of_a_null_section_starts_it_and_a_value_yaml_reads_as_a_number_gets_a_hint():
    assert load_config(None, ["data.long_tail.max=30"]).data.long_tail.max == 30  # long_tail is null by default
    with pytest.raises(ConfigError, match=r"data.source: .*YAML read it as 2024: quote it"):
        load_config(None, ["data.source=2024"])
