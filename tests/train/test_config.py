"""Config: YAML + --set, aliases, recipe defaults, one clear line for each kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from bigbatch.train.config import Config, LRScaling, parse_bytes
from bigbatch.train.configfile import (
    ALIASES,
    config_to_yaml,
    load_config,
    validate,
    with_recipe_defaults,
)
from bigbatch.train.yamlloader import MAX_DEPTH, MAX_VALUES, YamlRefused, load_yaml


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("global_batch_size: 64\nlr: 0.1\nlr_scaling:\n  rule: linear\n")
    config = load_config(path, ["lr=1e-3", "lr_scaling.rule=sqrt", "micro_batch_size=auto"])
    assert config.global_batch_size == 64
    assert config.lr == 0.001
    assert config.lr_scaling.rule == "sqrt"
    assert config.micro_batch_size == "auto"


@pytest.mark.parametrize(
    ("alias", "field"),
    [
        ("per_device_train_batch_size", "micro_batch_size"),
        ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ("train_batch_size", "global_batch_size"),
        ("learning_rate", "lr"),
        ("num_train_epochs", "epochs"),
        ("save_steps", "checkpoint_every"),
        ("eval_steps", "eval_every"),
        ("save_total_limit", "keep_checkpoints"),
        ("dataloader_num_workers", "num_workers"),
        ("gradient_clipping", "max_grad_norm"),
        ("accumulate_grad_batches", "gradient_accumulation_steps"),
        ("gradient_clip_val", "max_grad_norm"),
        ("max_epochs", "epochs"),
        ("batch_accumulate", "gradient_accumulation_steps"),
        ("initial_lr", "lr"),
    ],
)
def test_aliases_in_yaml_and_overrides(tmp_path, alias, field):
    path = tmp_path / "run.yaml"
    path.write_text(f"{alias}: 12\n")
    assert getattr(load_config(path), field) == 12
    assert getattr(load_config(None, [f"{alias}=7"]), field) == 7
    assert alias not in config_to_yaml(load_config(path))


def test_alias_and_name_together_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_batch_size: 8\nglobal_batch_size: 8\n")
    with pytest.raises(ValueError, match="alias of 'global_batch_size'"):
        load_config(path)


BAD = {
    "negative micro": (
        ["micro_batch_size=-3"],
        'config: micro_batch_size: must be a positive integer or "auto", got -3',
    ),
    "word for number": (["lr=fast"], 'config: lr: must be a number > 0, at most 1e6, got "fast"'),
    "boolean lr": (["lr=true"], "config: lr: must be a number > 0, at most 1e6, got true"),
    "boolean count": (["global_batch_size=true"], "global_batch_size: must be a positive integer"),
    "boolean seed": (["seed=false"], "config: seed: must be an integer >= 0, got false"),
    "boolean auto": (
        ["micro_batch_size=true"],
        'micro_batch_size: must be a positive integer or "a',
    ),
    "boolean stage": (["batch_size_schedule=[[0, true]]"], "batch_size_schedule: must be"),
    "boolean base": (["lr_scaling.base_batch_size=true"], "lr_scaling.base_batch_size: must be"),
    "lr beyond float32": (
        ["lr=1.0e+300"],
        "config: lr: must be a number > 0, at most 1e6, got 1e+300",
    ),
    "lr nan": (["lr=.nan"], "config: lr: must be"),
    "weight decay": (
        ["weight_decay=1.0e+7"],
        "config: weight_decay: must be a number >= 0, at most",
    ),
    "clip norm": (
        ["max_grad_norm=1.0e+39"],
        "config: max_grad_norm: must be a number > 0, at most",
    ),
    "nested enum": (
        ["lr_scaling.rule=cubic"],
        'config: lr_scaling.rule: must be "linear", "sqrt", "none" or "adascale", got "cubic"',
    ),
    "memory size": (["memory_budget=12 bananas"], "config: memory_budget: must be"),
    "unknown key": (["micro_batchsize=4"], "did you mean 'micro_batch_size'?"),
    "unknown nested key": (["lr_scaling.base=4"], "config: unknown key 'lr_scaling.base'"),
    "both lengths": (["max_steps=3", "epochs=1"], "set max_steps or epochs, not both"),
    "schedule order": (["batch_size_schedule=[[5, 8], [0, 16]]"], "batch_size_schedule: must"),
    "no equals": (["lr"], "--set expects key=value"),
    "checkpoint_async": (
        ["checkpoint_async=maybe"],
        'config: checkpoint_async: must be a boolean, got "maybe"',
    ),
}


@pytest.mark.parametrize(("overrides", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_values_give_one_line(overrides, expected):
    with pytest.raises(ValueError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("config:")
    assert expected in message


def test_numbers_within_bounds_are_kept():
    config = load_config(None, ["lr=1e6", "weight_decay=0", "max_grad_norm=3.0e+38", "seed=7"])
    assert (config.lr, config.weight_decay, config.max_grad_norm, config.seed) == (1e6, 0, 3e38, 7)
    assert load_config(None, ["lr=1e-3", "micro_batch_size=auto"]).lr == 1e-3


def test_yaml_reads_as_safe_load_does_within_bounds():
    text = "a: &b {x: 1, y: [1, 2]}\nc: {<<: *b, x: 3}\nd: *b\n1: one\n"
    assert load_yaml(text) == yaml.safe_load(text)  # anchors, aliases and merges still work
    assert load_yaml("- " * (MAX_DEPTH - 1) + "x") == yaml.safe_load("- " * (MAX_DEPTH - 1) + "x")


def test_yaml_values_are_counted_with_aliases_expanded(monkeypatch):
    monkeypatch.setattr("bigbatch.train.yamlloader.MAX_VALUES", 10)
    assert load_yaml("[1, 2, 3, 4, 5, 6, 7, 8, 9]") == list(range(1, 10))  # 10 with the list
    with pytest.raises(YamlRefused, match="more than 10 values"):
        load_yaml("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]")
    with pytest.raises(YamlRefused, match="more than 10 values once its aliases are expanded"):
        load_yaml("a: &a [1, 2, 3]\nb: [*a, *a]")  # 1 + a: 1 + 4, b: 1 + (1 + 4 + 4) = 16


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("lr: 1\nseed: 2\nlr: 3\n", 3, "key 'lr' appears twice (lines 1 and 3); keep one"),
        ("{1: a, 0x1: b}", 1, "key '0x1' appears twice; keep one"),  # the same integer
        ("a: {x: 1}\nb:\n  x: 1\n  y: 2\n  x: 3\n", 5, "key 'x' appears twice (lines 3 and 5)"),
        ("- " * MAX_DEPTH + "x", 1, f"nested deeper than {MAX_DEPTH} levels"),
        ("a: &a [*a]", 1, "alias *a refers to a value that contains it"),
        (
            "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
            + "\n".join(
                f"b{i}: &b{i} [" + ", ".join([f"*{'a' if i == 0 else f'b{i - 1}'}"] * 9) + "]"
                for i in range(6)
            ),
            6,
            f"more than {MAX_VALUES:,} values once its aliases are expanded",
        ),
    ],
    ids=["key twice", "same number twice", "nested key twice", "deep", "recursive", "bomb"],
)
def test_yaml_past_the_bounds_is_refused(text, line, reason):
    with pytest.raises(YamlRefused) as caught:
        load_yaml(text)
    assert reason in caught.value.reason and caught.value.line == line


def test_a_yaml_refusal_names_the_file_line_or_the_set_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\nrecipe_options: {a: 1, a: 2}\n")
    with pytest.raises(ValueError, match=r"run.yaml' line 2: key 'a' appears twice; keep one$"):
        load_config(path)
    with pytest.raises(ValueError, match=r"^config: --set 'recipe_options.x': the value nested"):
        load_config(None, ["recipe_options.x=" + "[" * 1000 + "]" * 1000])


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1, 2\nseed: 3\n")
    with pytest.raises(ValueError, match=r"not valid YAML at line \d+") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GiB", 20 * 1024**3), ("512MiB", 512 * 1024**2), ("1.5GB", 1_500_000_000), (1024, 1024)],
)
def test_memory_budget_units(text, expected):
    assert parse_bytes(text) == expected
    assert validate({"memory_budget": text}).memory_budget == expected


def test_recipe_defaults_fill_only_what_the_user_left_out():
    user = load_config(None, ["epochs=2", "lr_scaling.rule=sqrt"])
    recipe = {
        "global_batch_size": 256,
        "micro_batch_size": 16,
        "max_steps": 100,
        "lr": 0.01,
        "lr_scaling": {"rule": "linear", "base_batch_size": 128},
    }
    resolved = with_recipe_defaults(user, recipe)
    assert resolved.global_batch_size == 256
    assert resolved.micro_batch_size == 16
    assert (resolved.epochs, resolved.max_steps) == (2, None)  # the user's length wins whole
    assert resolved.lr == 0.01
    assert resolved.lr_scaling.rule == "sqrt"
    assert resolved.lr_scaling.base_batch_size == 128
    assert resolved.seed == Config().seed  # neither set it: built-in default


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(None, ["global_batch_size=32", "batch_size_schedule=[[0, 32], [10, 64]]"])
    text = config_to_yaml(config)
    assert yaml.safe_load(text)["batch_size_schedule"] == [[0, 32], [10, 64]]
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path) == config


def test_every_field_is_documented():
    for name, info in Config.model_fields.items():
        assert info.description, name
        assert info.json_schema_extra and info.json_schema_extra.get("allowed"), name


def test_aliases_name_real_fields_and_are_not_fields():
    fields = set(Config.model_fields)
    assert set(ALIASES.values()) <= fields
    assert not set(ALIASES) & fields
    with pytest.raises(ValueError, match="both set"):
        validate({"per_device_train_batch_size": 4, "micro_batch_size": 4})
    assert validate({"per_device_train_batch_size": 4}).micro_batch_size == 4


def _docs_key_table() -> dict[str, tuple[str, str, str]]:
    """The rows of docs/configuration.md's key table: key -> (allowed, default, meaning)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    row = re.compile(r"^\| `([\w.]+)` \| (.*?) \| `(.*?)` \| (.*) \|$", re.MULTILINE)
    return {match[1]: (match[2], match[3], match[4]) for match in row.finditer(text)}


def test_the_docs_key_table_is_the_schema():
    """Descriptions live once, on the fields: the docs table says exactly what they say."""
    fields = [*Config.model_fields.items()]
    fields += [(f"lr_scaling.{name}", info) for name, info in LRScaling.model_fields.items()]
    expected = {}
    for name, info in fields:
        default = "(see below)" if isinstance(info.default, LRScaling) else json.dumps(info.default)
        expected[name] = (info.json_schema_extra["allowed"], default, info.description)
    assert _docs_key_table() == expected


@pytest.mark.parametrize("switch", ["bf16", "fp16"])
def test_precision_switches(tmp_path, switch):
    assert validate({switch: True}).precision == switch
    assert validate({switch: False}).precision == "fp32"  # false asks for nothing
    assert load_config(None, [f"{switch}=true"]).precision == switch
    with pytest.raises(ValueError, match=f"{switch} must be true or false"):
        validate({switch: "yes please"})
    with pytest.raises(ValueError, match="both set"):
        validate({switch: True, "precision": "fp32"})


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("micro_batchsize", "did you mean 'micro_batch_size'?"),
        ("global_bach_size", "did you mean 'global_batch_size'?"),
        ("batch_size", "did you mean global_batch_size (the items of one step"),
        ("warmup_ratio", "did you mean warmup_steps"),
    ],
)
def test_unknown_keys_get_a_hint_of_the_same_meaning(key, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        validate({key: 1})


@pytest.mark.parametrize("key", ["save_every", "max_stepz_per_epoch", "dropout"])
def test_no_misleading_did_you_mean(key):
    with pytest.raises(ValueError) as error:
        validate({key: 1})
    assert "did you mean" not in str(error.value), str(error.value)
