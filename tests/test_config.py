"""Run configuration: defaults < YAML file < --section.key=value, strict types, errors that name the fix."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from pipedni.config import (
    SECTIONS,
    Config,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
    validate,
)
from pipedni.config.reference import reference_markdown
from pipedni.errors import ConfigError
from pipedni.schedules.registry import check_config

REPO = Path(__file__).parent.parent
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CONFIG_DOC = REPO / "docs" / "config.md"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- precedence


def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.schedule == "1f1b"
    assert cfg.train.microbatches == 4
    assert cfg.data.batch_size == 128
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.partition.balance is None
    assert cfg.run_dir == Path("runs") / "default"


def test_list_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.model.channels.append(128)
    assert b.model.channels == [32, 64]


def test_file_values_replace_defaults_and_keep_the_rest(tmp_path):
    path = write(tmp_path, "model:\n  width: 64\ntrain:\n  schedule: gpipe\n  microbatches: 8\n")
    cfg = load_config(path)
    assert (cfg.model.width, cfg.train.schedule, cfg.train.microbatches) == (64, "gpipe", 8)
    assert cfg.model.depth == Config().model.depth


def test_overrides_beat_the_file_which_beats_defaults(tmp_path):
    path = write(tmp_path, "model:\n  width: 64\n  depth: 5\n")
    cfg = load_config(path, ["--model.width=32", "--run.name=exp"])
    assert cfg.model.width == 32  # override beats file
    assert cfg.model.depth == 5  # file beats default
    assert cfg.run.name == "exp"  # override beats default
    assert cfg.run_dir == Path("runs") / "exp"


def test_later_override_wins():
    assert load_config(None, ["--model.width=32", "--model.width=48"]).model.width == 48


def test_list_override():
    cfg = load_config(None, ["--partition.balance=[1,2]"])
    assert cfg.partition.balance == [1, 2]
    assert load_config(None, ["--partition.balance=null"]).partition.balance is None


def test_override_without_leading_dashes_and_with_equals_in_value():
    assert parse_override("run.name=a=b") == ("run", "name", "a=b")
    assert parse_override("--run.dir=") == ("run", "dir", "")


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "model:\n", "empty_section.yaml")) == Config()


# --------------------------------------------------------------------------- types


def test_int_is_accepted_for_float_and_stored_as_float():
    cfg = load_config(None, ["--optim.lr=1", "--train.epochs=2"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert type(cfg.train.epochs) is float


def test_bool_is_not_an_int():
    """bool subclasses int in Python; `depth: true` is a typo, not depth 1."""
    with pytest.raises(ConfigError, match=r"model.depth = True \(command line\) is not valid; expected int"):
        load_config(None, ["--model.depth=true"])


def test_bool_is_not_a_float():
    with pytest.raises(ConfigError, match=r"optim.lr = True .* expected float"):
        load_config(None, ["--optim.lr=true"])


def test_string_is_not_a_float():
    with pytest.raises(ConfigError, match=r"optim.lr = 'fast' .* expected float"):
        load_config(None, ["--optim.lr=fast"])


def test_float_is_not_an_int():
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["--data.batch_size=12.5"])


def test_list_items_are_checked():
    with pytest.raises(ConfigError, match=r"partition.balance = \[1, 'x'\] .* expected list of int or null"):
        load_config(None, ["--partition.balance=[1,x]"])
    with pytest.raises(ConfigError, match="expected list of float"):
        load_config(None, ["--optim.betas=0.9"])


def test_exponent_notation_learning_rate(tmp_path):
    """Regression: `--optim.lr=1e-3` (and `lr: 1e-3` in a file) failed with "optim.lr = '1e-3' is not
    valid; expected float", because PyYAML only resolves floats that contain a dot."""
    assert load_config(None, ["--optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
    assert load_config(write(tmp_path, "optim:\n  lr: 3e-4\n")).optim.lr == pytest.approx(3e-4)


def test_numeric_text_is_accepted_for_string_fields():
    """Regression: --run.name=2024 was refused ("expected str") because overrides are parsed as YAML."""
    assert load_config(None, ["--run.name=2024"]).run.name == "2024"
    with pytest.raises(ConfigError, match="expected str"):
        load_config(None, ["--run.name=true"])


def test_literal_choices_are_named():
    with pytest.raises(ConfigError) as info:  # the schedules know their names: the config does not
        check_config(load_config(None, ["--train.schedule=bogus"]))
    msg = str(info.value)
    assert "train.schedule = 'bogus'" in msg
    for choice in ("single", "naive", "gpipe", "1f1b"):
        assert repr(choice) in msg


def test_literal_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  name: lbfgs\n")
    with pytest.raises(ConfigError, match=re.escape(f"optim.name = 'lbfgs' ({path})") + ".*'sgd' \\| 'adam' \\| 'adamw'"):
        load_config(path)


# --------------------------------------------------------------------------- unknown names and bad input


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--train.schedul=gpipe"])
    msg = str(info.value)
    assert "unknown key 'train.schedul'" in msg
    keys = sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert "schedule" in keys and f"valid keys of 'train': {', '.join(keys)}" in msg


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "model:\n  layers: 4\n")
    with pytest.raises(ConfigError, match=re.escape(f"unknown key 'model.layers' ({path}); valid keys of 'model': batchnorm")):
        load_config(path)


def test_unknown_section_lists_the_sections(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--trian.steps=3"])
    assert "unknown section 'trian'" in str(info.value)
    for section in SECTIONS:
        assert section in str(info.value)
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(write(tmp_path, "optimizer:\n  lr: 0.1\n"))


@pytest.mark.parametrize("arg", ["--train.steps", "--steps=3", "train.steps"])
def test_malformed_override(arg):
    with pytest.raises(ConfigError, match=f"override '{arg}' must look like --section.key=value"):
        parse_override(arg)


def test_missing_config_file_suggests_a_shipped_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass a YAML file such as configs/mlp_fashion.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "model:\n  width: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, got list"):
        load_config(write(tmp_path, "- model\n- train\n"))


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="section 'model' .* must be a mapping"):
        load_config(write(tmp_path, "model: mlp\n"))


# --------------------------------------------------------------------------- cross-field validation


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--data.batch_size=4", "--train.microbatches=8"], "train.microbatches = 8 exceeds data.batch_size = 4"),
        (["--train.microbatches=0"], "train.microbatches = 0; must be >= 1"),
        (["--train.steps=0", "--train.epochs=0"], "train.steps and train.epochs are both 0"),
        (["--train.steps=-1"], "train.steps = -1; must be >= 0"),
        (["--optim.betas=[0.9]"], r"optim.betas = \[0.9\]; give two numbers"),
        (["--optim.lr=0"], "optim.lr = 0.0; must be > 0"),
        (["--optim.grad_clip=-1"], "optim.grad_clip = -1.0; must be >= 0"),
        (["--data.batch_size=0"], "data.batch_size = 0; must be >= 1"),
        (["--data.eval_batch_size=0"], "data.eval_batch_size = 0"),
        (["--model.depth=0"], "model.depth = 0"),
        (["--model.width=0"], "model.width = 0"),
        (["--model.channels=[]"], "model.channels = \\[\\]"),
        (["--model.channels=[8,0]"], "give at least one positive channel count"),
        (["--dist.timeout_sec=0"], "dist.timeout_sec = 0.0"),
        (["--dist.queue_size=1"], "dist.queue_size = 1; must be >= 2"),
        (["--run.threads=-1"], "run.threads = -1"),
        (["--run.log_every=0"], "run.log_every = 0"),
        (["--partition.balance=[2,0]"], "every stage needs at least one layer"),
        (["--partition.balance=[]"], "every stage needs at least one layer"),
        (["--train.eval_every=-5"], "train.eval_every = -5"),
        (["--train.time_limit_sec=-1"], "train.time_limit_sec = -1.0; must be >= 0"),
        (["--train.time_limit_sec=60"], "checked at evaluations but train.eval_every = 0"),
        # regressions: these reached torch and ended in a traceback instead of one line
        (["--optim.momentum=-0.1"], "optim.momentum = -0.1; must be >= 0"),
        (["--optim.weight_decay=-1"], "optim.weight_decay = -1.0; must be >= 0"),
        (["--optim.betas=[1.5,0.9]"], r"optim.betas = \[1.5, 0.9\]; give two numbers in \[0, 1\)"),
        (["--model.hidden=-5"], "model.hidden = -5; must be >= 0"),
        (["--optim.lr=0.1", "--optim.min_lr=1.0"], r"optim.min_lr = 1.0 must lie in \[0, optim.lr = 0.1\]"),
        (["--optim.warmup_steps=-1"], "optim.warmup_steps = -1"),
        (["--model.batchnorm=true", "--data.batch_size=8", "--train.microbatches=8"], "model.batchnorm needs"),
        (["--dni.max_staleness=64"], r"dni.max_staleness x dni.microbatches = 64 must be below dist.queue_size = 64"),
        (["--dni.max_staleness=8", "--dni.microbatches=8"], "= 64 must be below dist.queue_size = 64"),
        (["--dni.microbatches=0"], "dni.microbatches = 0; must be >= 1"),
        (["--dni.microbatches=200"], "dni.microbatches = 200 exceeds data.batch_size = 128"),
        (["--dni.boundaries=[{max_staleness: 3}]"], r"dni.boundaries\[0\] sets 'max_staleness'"),
        (["--data.seq_len=0"], "data.seq_len = 0; must be >= 1"),
        (["--model.name=transformer", "--model.width=30", "--model.heads=4"],
         r"model.width = 30 does not divide into model.heads = 4 heads; use a width that is a multiple of 4 \(e.g. 32\)"),
        (["--model.name=transformer", "--model.heads=0"], "model.heads = 0; must be >= 1"),
        (["--model.name=transformer", "--model.batchnorm=true"], "the transformer uses LayerNorm"),
    ],
)
def test_validate_rejects_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_heads_are_checked_only_for_the_transformer():
    """model.heads means nothing to an mlp: its width need not divide by it."""
    assert load_config(None, ["--model.name=mlp", "--model.width=30"]).model.heads == 4


def test_steps_alone_or_epochs_alone_is_enough():
    load_config(None, ["--train.steps=5", "--train.epochs=0"])
    load_config(None, ["--train.steps=0", "--train.epochs=0.5"])


def test_microbatches_equal_to_batch_size_is_allowed():
    assert load_config(None, ["--data.batch_size=4", "--train.microbatches=4"]).train.microbatches == 4


def test_validate_runs_on_a_hand_built_config():
    cfg = Config()
    cfg.train.microbatches = cfg.data.batch_size + 1
    with pytest.raises(ConfigError, match="exceeds data.batch_size"):
        validate(cfg)


def test_config_from_dict_validates():
    assert config_from_dict({"model": {"width": 8}}).model.width == 8
    with pytest.raises(ConfigError, match="exceeds"):
        config_from_dict({"data": {"batch_size": 2}, "train": {"microbatches": 4}})


# --------------------------------------------------------------------------- saving and the reference


def test_save_then_load_round_trips(tmp_path):
    """The run directory's config.yaml must reload to the same run, including lists and nulls."""
    cfg = load_config(
        None,
        [
            "--run.name=roundtrip",
            "--run.dir=out/here",
            "--model.name=cnn",
            "--model.channels=[3,5,7]",
            "--partition.balance=[1,2,1]",
            "--optim.betas=[0.8,0.99]",
            "--train.epochs=2.5",
            "--checkpoint.enabled=false",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    default_path = tmp_path / "default.yaml"
    save_config(Config(), default_path)
    assert load_config(default_path) == Config()


def test_reference_has_one_documented_row_per_field():
    lines = reference_markdown().splitlines()
    assert lines[:2] == ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    rows = lines[2:]
    expected = [f"`{s}.{f.name}`" for s, tp in SECTIONS.items() for f in dataclasses.fields(tp)]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == expected
    for section_type in SECTIONS.values():
        for f in dataclasses.fields(section_type):
            assert f.metadata.get("doc", "").strip(), f"{section_type.__name__}.{f.name} has no doc"
    for row in rows:
        assert row.count(" | ") == 3, f"a '|' leaked into a cell: {row}"


def test_sections_cover_every_config_field():
    assert list(SECTIONS) == [f.name for f in dataclasses.fields(Config)]
    hints = typing.get_type_hints(Config)
    assert all(SECTIONS[name] is hints[name] for name in SECTIONS)


def test_config_doc_embeds_the_current_reference():
    """docs/config.md's table is generated: after a field changes, regenerate it with
    ``python -m pipedni.config docs/config.md``."""
    assert reference_markdown() in CONFIG_DOC.read_text()


# --------------------------------------------------------------------------- shipped configs


def test_there_are_shipped_configs():
    assert SHIPPED_CONFIGS, f"no YAML files under {REPO / 'configs'}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=[p.name for p in SHIPPED_CONFIGS])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
