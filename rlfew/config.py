"""Typed run configuration: dataclasses loaded from YAML recipes plus `key=value` overrides.

Why plain dataclasses and not pydantic / omegaconf: all we need is typed sections, YAML in and out,
and validation errors that name the full dotted key (`train.steps`) with what is allowed there. That is
a few hundred lines over the standard library and PyYAML; a config framework would add a dependency,
its own interpolation / coercion rules, and error messages we do not control.

Two mappings stay free in the YAML and are validated once the method is known: `algo.options` against the
method's options dataclass (`rlfew.method.resolve_algo_options`), and `roles` against its role table
(`rlfew.models.merge_role_specs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from rlfew.errors import ConfigError

log = logging.getLogger(__name__)

Schema = TypeVar("Schema")


# --------------------------------------------------------------------------------------------- schema

@dataclass
class RewardSpec:
    """One reward of a run: what to load (a built-in name, `module:attr`, an entry point), its weight, its
    constructor options, and optionally the Ray `runtime_env` of its worker (pip / py_modules / env_vars ...), so
    its dependencies never meet the trainer's. Plain data: a reward worker receives the spec and loads it."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"reward: every reward needs a non-empty name, got {self.name!r}")
        self.name = self.name.strip()
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ConfigError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")
        self.weight = float(self.weight)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"reward {self.name!r}: options must be a mapping, got {type(self.options).__name__}")
        self.options = dict(self.options)

    def __str__(self) -> str:
        return f"{self.name}:{self.weight:g}"


def parse_reward_spec(value: str | RewardSpec | Mapping | Sequence) -> list[RewardSpec]:
    """Reward specs from the CLI shortcut `"pickscore:1.0,hpsv2:0.5"` (the weight is an optional trailing
    `:<number>`, so `my_pkg.rewards:score` is a name), a `{name, weight, options, runtime_env}` mapping, a
    RewardSpec, or a list of any of these. Names must be unique within one spec."""
    if isinstance(value, RewardSpec):
        specs = [value]
    elif isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"reward: empty reward spec {value!r}; expected e.g. 'pickscore:1.0,hpsv2:0.5'")
        specs = []
        for part in value.split(","):
            if not part.strip():
                raise ConfigError(f"reward: empty entry in {value!r}; expected NAME[:WEIGHT],NAME[:WEIGHT],...")
            head, sep, tail = part.strip().rpartition(":")
            try:
                specs.append(RewardSpec(head, float(tail)) if sep else RewardSpec(part))
            except ValueError:  # the colon belongs to a `module:attr` name, not a weight
                specs.append(RewardSpec(part))
    elif isinstance(value, Mapping):
        specs = [config_from_dict(RewardSpec, dict(value), prefix="reward")]
    elif isinstance(value, Sequence):
        specs = [spec for item in value for spec in parse_reward_spec(item)]
    else:
        raise ConfigError(f"reward: cannot read a reward spec from {type(value).__name__}: {value!r}")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"reward: {duplicates[0]!r} appears twice in one reward spec")
    return specs


def _reward_list_from_shortcut(value: Any) -> Any:
    """`reward: "pickscore:1.0,hpsv2:0.5"` in YAML or `reward=pickscore` as an override means the same as the list."""
    if isinstance(value, str):
        return [dataclasses.asdict(spec) for spec in parse_reward_spec(value)]
    return value


@dataclass
class RunSection:
    name: str | None = None  # None: "<algo>-<timestamp>", chosen when the run directory is created
    output_dir: str = "runs"
    seed: int = 0
    resume: str | None = None  # "auto": latest checkpoint in the run directory; otherwise a checkpoint path


@dataclass
class ModelSection:
    source: str = "world:teacher"  # the pipeline (hub id, local diffusers folder, or world:<name>)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # frozen weights; trainable ones stay float32
    device: str = "auto"
    resolution: int | None = None  # None: the model's native resolution


@dataclass
class GeneratorSection:
    source: str | None = None  # the student network's folder; None: model.source
    steps: int = 4
    shift: float | None = None  # None: the scheduler's own shift


@dataclass
class TeacherSection:
    source: str | None = None  # the teacher network's folder; None: model.source
    guidance: float = 4.5


@dataclass
class AlgoSection:
    name: str = "dmd"
    options: dict[str, Any] = field(default_factory=dict)  # validated by rlfew.method.resolve_algo_options


@dataclass
class TrainSection:
    steps: int = 1000
    prompts_per_step: int = 8  # prompts per iteration over all learners (a multiple of runtime.num_learners)
    group_size: int = 1  # images per prompt; a group is never split across learners or micro-batches
    micro_batch_size: int | None = None  # images per forward/backward (gradients accumulate); None: the whole shard
    lr: float = 1e-4  # the default of every trainable role (roles.<name>.lr overrides)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_checkpoints: int | None = None  # keep only the newest N checkpoints; None: all
    sample_every: int = 100
    max_nonfinite_steps: int = 5  # abort after this many skipped (non-finite) updates in a row
    prompts: str = "world:train"

    def __post_init__(self):
        for key in ("steps", "prompts_per_step", "group_size", "log_every", "save_every", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1 (or null: keep all), got {self.keep_checkpoints}")
        if self.micro_batch_size is not None and (self.micro_batch_size < self.group_size
                                                  or self.micro_batch_size % self.group_size):
            raise ConfigError(f"train.micro_batch_size: must be a multiple of train.group_size "
                              f"({self.group_size}) so groups stay whole, got {self.micro_batch_size}")


@dataclass
class EvalSection:
    prompts: str = "world:eval"
    steps: int | None = None  # None: generator.steps
    images_per_prompt: int = 4
    max_prompts: int | None = None


@dataclass
class RuntimeSection:
    backend: Literal["ray", "inprocess"] = "ray"
    placement: Literal["colocated", "disaggregated"] = "colocated"
    num_rollout_workers: int = 1
    num_learners: int = 1
    num_cpus: int | None = None  # None: Ray's own detection
    address: str | None = None  # None: start a local Ray; otherwise a cluster address ("auto", "ray://...")
    # Disaggregated only: rollouts may run this many updates behind (0: strictly on-policy). With 1, the rollout
    # of step i+1 overlaps the update of step i.
    max_staleness: Literal[0, 1] = 0

    def __post_init__(self):
        for key in ("num_rollout_workers", "num_learners"):
            if getattr(self, key) < 1:
                raise ConfigError(f"runtime.{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_staleness > 0 and self.placement != "disaggregated":
            raise ConfigError("runtime.max_staleness: overlapping rollouts with updates needs "
                              "runtime.placement=disaggregated (colocated learners roll out themselves)")


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    # Overrides of the method's role table: {role: {lora_rank: 0, lr: 2.0e-5, ...}} (rlfew.models.RoleSpec).
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    algo: AlgoSection = field(default_factory=AlgoSection)
    reward: list[RewardSpec] = field(default_factory=list, metadata={"before_validation": _reward_list_from_shortcut})
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def __post_init__(self):
        if self.train.prompts_per_step % self.runtime.num_learners:
            raise ConfigError(f"train.prompts_per_step: {self.train.prompts_per_step} prompt groups cannot be "
                              f"shared evenly by runtime.num_learners={self.runtime.num_learners} learners")


# Keys of earlier versions: an old recipe gets told where the setting lives now.
MOVED_KEYS = {
    "train.batch_size": "train.prompts_per_step (prompts per iteration over all learners) × train.group_size",
    "train.critic_lr": "roles.critic.lr",
    "critic": "roles.critic (e.g. roles.critic.lora_rank)",
    "generator.lora_rank": "roles.generator.lora_rank",
    "generator.lora_alpha": "roles.generator.lora_alpha",
    "generator.lora_targets": "roles.generator.lora_targets",
    "generator.sampler": "the method (DMD-family rollouts are CPS with η = 1; rlfew sample --sampler for sampling)",
    "generator.eta": "the method's options",
    "generator.noise_level": "the method's options",
    "model.family": "nothing: the family is read from the pipeline's denoiser class",
}
_SCHEMA_SECTIONS = (TrainConfig, TrainSection, GeneratorSection, ModelSection)


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.algo.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------ validation

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (nested dataclasses built)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _convert(value, candidate, key)
            except ConfigError as err:
                errors.append(err)
        if len(candidates) == 1:
            optional = " (or null)" if type(None) in args else ""
            raise ConfigError(f"{errors[0]}{optional}") from None
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value in args:
            return value
        allowed = ", ".join(repr(arg) for arg in args)
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        (item_type,) = args or (Any,)
        return [_convert(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        key_type, value_type = args or (str, Any)
        return {_convert(k, key_type, f"{key} key"): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: config annotation {tp!r} is not supported")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _build_dataclass(cls: type[Schema], data: Any, prefix: str) -> Schema:
    where = prefix or "config"
    if isinstance(data, cls):
        data = config_to_dict(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                          f"got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            dotted = f"{prefix}.{name}" if prefix else str(name)
            if cls in _SCHEMA_SECTIONS and dotted in MOVED_KEYS:
                raise ConfigError(f"{dotted!r} has moved: use {MOVED_KEYS[dotted]}")
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {dotted!r}{hint}; allowed keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{dotted}: missing required key")
            continue
        value = data[name]
        if "before_validation" in spec.metadata:
            value = spec.metadata["before_validation"](value)
        values[name] = _convert(value, hints[name], dotted)
    return cls(**values)


def config_from_dict(schema: type[Schema], data: dict[str, Any] | None, prefix: str = "") -> Schema:
    """Validate a plain mapping against a dataclass schema; errors name the dotted key (under `prefix`)."""
    return _build_dataclass(schema, data, prefix)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------- YAML, overrides

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.2); plain PyYAML needs `1.0e-4`."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{source}:{where}: invalid YAML: {problem}") from None


def _field_type(schema: type, dotted_key: str) -> Any:
    """The annotation at `dotted_key` in the schema, or None where the path leaves the typed schema."""
    tp: Any = schema
    for name in dotted_key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if name not in hints:
            return None
        tp = hints[name]
    return tp


def _is_string_field(tp: Any) -> bool:
    if _is_union(tp):
        return all(arg in (str, type(None)) for arg in typing.get_args(tp))
    return tp is str


def _parse_override(override: str, schema: type) -> tuple[list[str], Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like key.sub=value (e.g. train.lr=1e-4)")
    if _is_string_field(_field_type(schema, key)) and raw.strip() not in ("null", "~"):
        # A string field keeps the text as typed: run.name=2024 or run.name=on must not become an int / bool.
        return key.split("."), raw
    return key.split("."), _parse_yaml(raw, f"override {override!r}")


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str], schema: type = TrainConfig) -> dict[str, Any]:
    """Set each `key.sub=value` in the nested mapping (in place) and return it."""
    for override in overrides:
        path, value = _parse_override(override, schema)
        node = data
        for depth, name in enumerate(path[:-1]):
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                prefix = ".".join(path[: depth + 1])
                raise ConfigError(f"override {override!r}: {prefix} is {_describe(child)}, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {_describe(data)}")
    return data


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = (),
                schema: type[Schema] = TrainConfig) -> Schema:
    """Read a YAML recipe (None: schema defaults), apply `key=value` overrides, and validate."""
    data = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(schema, apply_overrides(data, overrides, schema))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the config as YAML (readable back with load_config); replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))
    os.replace(partial, path)
    return path


# ------------------------------------------------------------------------------------------------- CLI

def _looks_like_override(token: str) -> bool:
    return re.match(r"^[A-Za-z_][\w.]*=", token) is not None


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `[CONFIG.yaml] [key=value ...] --set key=value --algo NAME --reward SPEC` to a command.

    Bare `key=value` tokens must be contiguous with the config path (argparse takes one block of
    positionals); `--set` works anywhere on the line.
    """
    parser.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                        help="YAML recipe (optional) followed by overrides such as train.lr=1e-4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train.steps=200")
    parser.add_argument("--algo", metavar="NAME", help="shortcut for algo.name=NAME (drops the recipe's "
                        "algo.options when the method changes)")
    parser.add_argument("--reward", metavar="SPEC", help="shortcut for the reward list, e.g. pickscore:1.0,hpsv2:0.5")
    parser.add_argument("--model", metavar="SOURCE", help="shortcut for model.source (hub id, folder, world:NAME)")
    return parser


def config_from_args(args: argparse.Namespace, schema: type[Schema] = TrainConfig) -> Schema:
    """Build the config from `add_config_arguments` options: recipe, then shortcuts, then overrides."""
    paths = [token for token in args.config_and_overrides if not _looks_like_override(token)]
    bare_overrides = [token for token in args.config_and_overrides if _looks_like_override(token)]
    if len(paths) > 1:
        raise ConfigError(f"more than one config file given: {', '.join(paths)} (overrides look like key=value)")
    data = read_yaml_mapping(paths[0]) if paths else {}
    if getattr(args, "algo", None):
        algo = data.get("algo")
        if isinstance(algo, dict) and algo.get("name", args.algo) != args.algo and algo.get("options"):
            log.warning("--algo %s replaces the recipe's algo %r; its algo.options are dropped",
                        args.algo, algo.get("name"))
            algo.pop("options")
        apply_overrides(data, [f"algo.name={args.algo}"], schema)
    if getattr(args, "reward", None):
        data["reward"] = _reward_list_from_shortcut(args.reward)
    if getattr(args, "model", None):
        data.setdefault("model", {})["source"] = args.model
    apply_overrides(data, [*args.overrides, *bare_overrides], schema)
    return config_from_dict(schema, data)
