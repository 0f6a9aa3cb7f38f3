"""Loading a run configuration: YAML files, `--set a.b=c` overrides, aliases, one-line errors.

Values come from, in order of precedence: `--set` overrides, the YAML file, the recipe's
`defaults`, the built-in defaults of `bigbatch.train.config.Config`. HF / DeepSpeed names are
accepted as aliases here, at the loading boundary only; the schema itself knows one name per field.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bigbatch.train.config import Config
from bigbatch.train.yamlloader import YamlRefused, load_yaml
from bigbatch.units import UsageError, shorten

MAX_CONFIG_BYTES = 256 * 2**10
"""A config larger than this (256 KiB) is refused: it is a small YAML file, not data (reading a
MiB of YAML takes seconds)."""

# Names users know from other frameworks -> the field they mean (same value).
ALIASES: dict[str, str] = {
    # Hugging Face Trainer (TrainingArguments)
    "per_device_train_batch_size": "micro_batch_size",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "save_steps": "checkpoint_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints",
    "dataloader_num_workers": "num_workers",
    # DeepSpeed
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "train_batch_size": "global_batch_size",  # the global batch over every rank
    "gradient_clipping": "max_grad_norm",
    # PyTorch Lightning (Trainer arguments)
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "gradient_clip_val": "max_grad_norm",
    "max_epochs": "epochs",
    # Super-Gradients (training_params)
    "batch_accumulate": "gradient_accumulation_steps",
    "initial_lr": "lr",
}
# Boolean switches that set a field to one value (Hugging Face's bf16 / fp16 flags).
SWITCH_ALIASES: dict[str, tuple[str, str]] = {
    "bf16": ("precision", "bf16"),
    "fp16": ("precision", "fp16"),
}
# Names that mean something close but not the same: a hint instead of a guess.
HINTS: dict[str, str] = {
    "batch_size": "global_batch_size (the items of one step over every rank) or "
    "micro_batch_size (one forward on one rank)",
    "per_device_eval_batch_size": "micro_batch_size (evaluation uses the training micro-batch)",
    "warmup_ratio": "warmup_steps (a number of optimizer steps)",
    "lr_scheduler_type": "lr_schedule",
    "gradient_accumulation": "gradient_accumulation_steps",
    "output_dir": "the --out option of bigbatch train",
    "optimizer": "the recipe's optimizer (recipes choose it)",
}


def _describe(value: Any) -> str:
    """The value as JSON, cut short: a message never echoes a huge value back."""
    if isinstance(value, int) and not isinstance(value, bool):
        return shorten(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return shorten(value)
    return text if len(text) <= 60 else f"{text[:55]}...{text[-2:]}"


def _field_path(loc: Sequence[Any]) -> tuple[str, str | None]:
    """The dotted field path of an error location and the field's allowed values."""
    model: Any = Config
    parts: list[str] = []
    allowed: str | None = None
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
            break  # the item of a list: name it, not its inner positions
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            break  # a union member's tag such as 'int' or "literal['auto']"
        parts.append(("." if parts else "") + part)
        extra = fields[part].json_schema_extra
        allowed = extra.get("allowed") if isinstance(extra, dict) else None  # type: ignore[assignment]
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
    return "".join(parts), allowed


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    """One line naming the first bad field, its value and what is allowed."""
    first = error.errors()[0]
    loc = tuple(first.get("loc", ()))
    if first["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in loc)
        parent: Any = Config
        for part in loc[:-1]:
            parent = getattr(parent.model_fields.get(part), "annotation", None)
        names = list(getattr(parent, "model_fields", {}))
        hint = _suggestion(str(loc[-1])[:100], names)
        return f"{source}: unknown key {shorten(key)}{hint}; see docs/configuration.md for the keys"
    if not loc:  # a model-level check: its message carries the field name
        return f"{source}: {str(first['msg']).removeprefix('Value error, ')}"
    path, allowed = _field_path(loc)
    if first["type"] == "too_large":
        return f"{source}: {path}: {_describe(first.get('input'))} {first['msg']}"
    if allowed is None:
        return f"{source}: {path}: {first['msg']}, got {_describe(first.get('input'))}"
    return f"{source}: {path}: must be {allowed}, got {_describe(first.get('input'))}"


def _suggestion(key: str, names: list[str]) -> str:
    """A hint for an unknown key: a known near-synonym, or a field of the same meaning.

    Spelling alone misleads (``save_steps`` is not ``max_steps``), so a close spelling is only
    offered when it starts with the same word or differs by a typo.
    """
    if key in HINTS:
        return f" (did you mean {HINTS[key]}?)"
    for close in difflib.get_close_matches(key, names, n=3, cutoff=0.6):
        same_start = close.split("_")[0] == key.split("_")[0]
        if same_start or difflib.SequenceMatcher(None, key, close).ratio() >= 0.85:
            return f" (did you mean {close!r}?)"
    return ""


def _apply_aliases(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The mapping with HF / DeepSpeed names replaced by ours; a name given twice is an error."""
    result: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in data.items():
        name = ALIASES.get(key, key)
        if key in SWITCH_ALIASES:
            name, value = _switch(key, value, source)
            if value is None:
                continue  # `bf16: false` asks for nothing
        if name in result:
            _refuse_both(given_as[name], key, name, source)
        result[name], given_as[name] = value, key
    return result


def _switch(key: str, value: Any, source: str) -> tuple[str, Any]:
    """``bf16: true`` -> ``("precision", "bf16")``; false -> (name, None): nothing is set."""
    name, setting = SWITCH_ALIASES[key]
    if not isinstance(value, bool):
        raise UsageError(f"{source}: {key} must be true or false (an alias of {name}: {setting})")
    return name, setting if value else None


def _refuse_both(first: str, second: str, name: str, source: str) -> None:
    """One field given under two spellings: name both, and which one is the alias."""
    aliases = [key for key in (first, second) if key != name]
    which = " and ".join(repr(key) for key in aliases)
    raise UsageError(
        f"{source}: {first!r} and {second!r} both set {name!r} ({which} "
        f"{'is an alias' if len(aliases) == 1 else 'are aliases'} of {name!r}): keep one"
    )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lr_scaling": {"rule": "sqrt"}}`` -> ``{"lr_scaling.rule": "sqrt"}``, the keys of --set;
    an empty mapping leaves nothing.

    >>> flatten({"lr": 0.1, "lr_scaling": {"rule": "sqrt", "base_batch_size": 256}})
    {'lr': 0.1, 'lr_scaling.rule': 'sqrt', 'lr_scaling.base_batch_size': 256}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"lr_scaling.rule=sqrt"` -> (["lr_scaling", "rule"], "sqrt"), the value read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise UsageError(f"config: --set expects key=value such as lr=1e-3, got {shorten(text)}")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except YamlRefused as error:
        raise UsageError(
            f"config: --set {shorten(key.strip())}: the value {error.reason}"
        ) from None
    except (yaml.YAMLError, ValueError):
        # Not YAML (an unbalanced bracket), or an integer too long for Python to read (over 4300
        # digits): keep the text, and validation names the field.
        value = raw
    return key.strip().split("."), value


def _read_yaml(path: Path) -> dict[str, Any]:
    name = shorten(str(path), limit=200)
    try:
        if not path.exists():
            raise UsageError(f"config: file {name} not found")
        if path.is_dir():
            raise UsageError(f"config: {name} is a directory; give a YAML file")
        if not path.is_file():
            raise UsageError(f"config: {name} is not a regular file; give a YAML file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UsageError(
                f"config: {name} holds {size:,} bytes; a config is a small YAML file (at most "
                f"{MAX_CONFIG_BYTES:,} bytes)"
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"config: {name} is not a text file (byte {error.start} is not UTF-8); give a YAML file"
        ) from None
    except OSError as error:  # unreadable, or a name too long for the file system
        raise UsageError(f"config: cannot read {name}: {error.strerror}") from None
    try:
        data = load_yaml(text)
    except YamlRefused as error:
        where = f" line {error.line}" if error.line is not None else ""
        raise UsageError(f"config: {name}{where}: {error.reason}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise UsageError(f"config: {name} is not valid YAML{where}: {problem}") from None
    except ValueError:  # an integer of more than 4300 digits, which Python refuses to read
        raise UsageError(
            f"config: {name} holds a number too long to read (over 4300 digits)"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"config: {name} must hold a mapping of keys to values, got a {type(data).__name__}"
        )
    return data


def validate(data: Mapping[str, Any], source: str = "config") -> Config:
    """A Config from a plain mapping (aliases accepted); ValueError with one line on bad input."""
    try:
        return Config.model_validate(_apply_aliases(dict(data), source))
    except ValidationError as error:
        raise UsageError(format_validation_error(error, source)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `--set key=value` overrides and validate.

    Raises:
        UsageError: one line naming the problem (missing file, malformed YAML, unknown key,
            wrong type or out-of-range value, with what is allowed, a field set twice).

    Example:
        >>> config = load_config(None, ["train_batch_size=512", "lr_scaling.rule=sqrt"])
        >>> config.global_batch_size, config.lr_scaling.rule
        (512, 'sqrt')
    """
    data = _apply_aliases(_read_yaml(Path(path)) if path is not None else {}, "config")
    given_as: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        name = ALIASES.get(keys[0], keys[0])
        if given_as.get(name, keys[0]) != keys[0]:  # --set gave one field under two names
            _refuse_both(given_as[name], keys[0], name, "config: --set")
        given_as[name], keys[0] = keys[0], name
        target = data
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    return validate(data)


def with_recipe_defaults(config: Config, defaults: Mapping[str, Any]) -> Config:
    """The config with the recipe's defaults filled in where the user set nothing.

    Setting either max_steps or epochs overrides both of the recipe's; likewise a global batch
    in samples or in tokens (docs/tokens.md).
    """
    recipe = validate(defaults, "recipe defaults").model_dump(exclude_unset=True)
    user = config.model_dump(exclude_unset=True)
    if "max_steps" in user or "epochs" in user:
        recipe.pop("max_steps", None)
        recipe.pop("epochs", None)
    _drop_other_unit(recipe, user)
    merged = {**recipe, **user}
    if isinstance(recipe.get("lr_scaling"), dict) and isinstance(user.get("lr_scaling"), dict):
        merged["lr_scaling"] = {**recipe["lr_scaling"], **user["lr_scaling"]}
    return validate(merged)


_SAMPLE_KEYS = ("global_batch_size", "micro_batch_size", "gradient_accumulation_steps")
_TOKEN_KEYS = ("global_batch_tokens", "micro_batch_tokens", "packing")


def _drop_other_unit(recipe: dict[str, Any], user: dict[str, Any]) -> None:
    """A user's global batch in tokens replaces the recipe's in samples, and the reverse."""
    if "global_batch_tokens" in user:
        for key in _SAMPLE_KEYS:
            recipe.pop(key, None)
    if "global_batch_size" in user:
        for key in _TOKEN_KEYS:
            recipe.pop(key, None)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML (for --print-config, run directories and checkpoints)."""
    data = config.model_dump(mode="json")
    if isinstance(data.get("batch_size_schedule"), list):
        data["batch_size_schedule"] = [list(stage) for stage in data["batch_size_schedule"]]
    return yaml.safe_dump(data, sort_keys=False)


def describe_keys(width: int = 100) -> str:
    """Every config key with what it allows, its default and its description, from the schema.

    What ``bigbatch train --help-config`` prints; the aliases follow.
    """
    import textwrap

    from bigbatch.train.config import LRScaling

    fields = [*Config.model_fields.items()]
    fields += [(f"lr_scaling.{name}", info) for name, info in LRScaling.model_fields.items()]
    lines = ["config keys (YAML or --set key=value):", ""]
    for name, info in fields:
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        default = "(a mapping)" if isinstance(info.default, LRScaling) else json.dumps(info.default)
        lines.append(f"{name}: {extra.get('allowed')}; default {default}")
        lines += textwrap.wrap(
            str(info.description), width, initial_indent="    ", subsequent_indent="    "
        )
    lines += ["", "names from other frameworks, accepted as aliases:"]
    for alias, name in ALIASES.items():
        lines.append(f"  {alias} -> {name}")
    for alias, (name, setting) in SWITCH_ALIASES.items():
        lines.append(f"  {alias}: true -> {name}: {setting}")
    return "\n".join(lines)
