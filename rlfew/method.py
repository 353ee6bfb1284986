"""The seam between the runtime and the methods (DMD2, DMDR, GRPO, TDM-R1, ...).

The runtime reads one thing from a method, its `MethodSpec`: the roles it needs (a table a recipe overrides under
`roles:`), how rollouts are drawn at each step, where rewards come from, how advantages are normalised, and how
stale a rollout may be. Each iteration it hands the method a `Batch` (this learner's shard of the rollout, with
scores and advantages computed on the whole batch) and gets a `StepResult` back. A method owns its optimisers
(one `RoleOptimizer` per trainable role, built here from the role table) and writes its `train_step` top to
bottom; checkpoints loop over roles and optimisers, so a new role needs no code here.

`build_method(cfg)` is what the learner and the tests call.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from rlfew.algos.advantages import AdvantageSpec
from rlfew.config import TrainConfig, TrainSection, config_from_dict
from rlfew.errors import ConfigError, UsageError
from rlfew.models import Conditioning, Roles, RoleSpec, build_roles, merge_role_specs
from rlfew.models.loading import resolve_device
from rlfew.optim import OptimizerSettings, RoleOptimizer
from rlfew.sampling import Sampler, Trajectory

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the contract

@dataclass
class RolloutSpec:
    """How the generator samples one step's rollout."""

    sampler: Sampler  # the kernel of the stochastic steps
    stochastic_steps: list[int] | None = None  # steps that use `sampler`, the others deterministic; None: all
    shared_noise_in_group: bool = False  # one initial noise per group (DanceGRPO's init_same_noise)


@dataclass
class MethodSpec:
    roles: dict[str, RoleSpec]  # what the method needs; a recipe overrides fields under `roles:`
    rollout: Callable[[int], RolloutSpec]  # per step, so a window of stochastic steps can move
    # none: no reward (configured rewards are only scored and logged); in_learner: the learner holds the
    # (differentiable) reward itself; workers: reward workers score every rollout and the method trains on it.
    rewards: Literal["none", "in_learner", "workers"] = "none"
    advantages: AdvantageSpec | None = None  # with rewards="workers": group-normalised advantages for the batch
    max_staleness: int = 0  # the most updates a rollout may lag behind the weights the method trains


@dataclass
class Batch:
    """One iteration's input to `Method.train_step`: this learner's shard, whole groups only."""

    step: int  # iteration index, 0-based
    trajectory: Trajectory  # the rollout; .scores / .rewards / .advantages set when the method uses rewards
    cond: Conditioning  # encoded prompts of `trajectory.prompts`, on the learner's device
    shared_rng: torch.Generator  # the same stream on every learner: choices all ranks must agree on (step k)
    rng: torch.Generator  # this learner's own stream: noise levels and noise, different on every learner
    micro_batch_size: int | None = None  # images per forward/backward; None: the whole shard

    def __len__(self) -> int:
        return len(self.trajectory)

    def micro_batches(self) -> list[slice]:
        """Consecutive slices of at most `micro_batch_size` images that never split a group."""
        size = self.micro_batch_size or len(self)
        slices = [slice(start, min(start + size, len(self))) for start in range(0, len(self), size)]
        groups = self.trajectory.group_ids.cpu()
        for left, right in zip(slices, slices[1:]):
            if groups[left.stop - 1] == groups[right.start]:
                raise UsageError(f"train.micro_batch_size={size} splits group {int(groups[right.start])}; "
                                 f"use a multiple of train.group_size")
        return slices


@dataclass
class StepResult:
    metrics: dict[str, float]
    # An update this step planned was not applied (a non-finite loss or gradient). The trainer aborts after
    # train.max_nonfinite_steps of these in a row.
    skipped: bool = False


class Method(abc.ABC):
    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass; its fields are `algo.options` in the config
    moved_options: ClassVar[dict[str, str]] = {}  # options of earlier versions -> where the setting lives now

    def __init__(self, roles: Roles, options: Any, cfg: TrainConfig, reward=None):
        self.roles = roles
        self.options = options
        self.cfg = cfg
        self.reward = reward
        self.optimizers: dict[str, RoleOptimizer] = {
            name: RoleOptimizer(name, roles[name].trainable_parameters(),
                                optimizer_settings(roles.specs[name], cfg.train),
                                after_step=[functools.partial(roles.update_ema, ema) for ema in roles.ema_roles(name)])
            for name in roles.trainable()}
        self.modules: dict[str, nn.Module] = {}  # trainable modules that are not roles (e.g. a GAN head)

    @classmethod
    @abc.abstractmethod
    def spec(cls, cfg: TrainConfig, options: Any) -> MethodSpec:
        """What the runtime needs to know; class-level, so rollout workers read it without building the method."""

    @classmethod
    def check_roles(cls, roles: dict[str, RoleSpec], options: Any) -> None:
        """Constraints between the (recipe-overridden) role table and the options; errors name the key."""

    @classmethod
    def check_inputs(cls, cfg: TrainConfig, options: Any) -> None:
        """Checks that read the filesystem (data folders), run once by `rlfew train` before the run directory is
        written; may normalise paths in `cfg.algo.options` for workers elsewhere. Default: nothing to check."""

    @abc.abstractmethod
    def train_step(self, batch: Batch) -> StepResult:
        """Update parameters from one batch."""

    def add_module(self, name: str, module: nn.Module, settings: OptimizerSettings) -> RoleOptimizer:
        """Train `module` (not a role) with its own optimiser; it is checkpointed with the roles. A checkpoint
        without it resumes with it fresh (DMD2's SD1.5 protocol adds a GAN head to a distilled run)."""
        self.modules[name] = module
        self.optimizers[name] = RoleOptimizer(name, list(module.parameters()), settings)
        return self.optimizers[name]

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """{"tensors": {role or module: weights}, "state": {"optimizers": {name: state}}}; tensors are references
        (as torch's state_dict), written out at once by the checkpoint."""
        tensors = {name: self.roles[name].trainable_state_dict() for name in self.roles.trainable()}
        tensors.update({name: self.roles[name].trainable_state_dict() for name in self.roles.ema_roles()})
        tensors.update({name: {k: v.detach() for k, v in module.state_dict().items()}
                        for name, module in self.modules.items()})
        return {"tensors": tensors,
                "state": {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, optimizers = state["tensors"], state["state"].get("optimizers")
        if optimizers is None:
            raise UsageError("the checkpoint was written before rlfew's roles-as-data runtime and cannot be resumed; "
                             "export its generator (rlfew export) and start a new run from it")
        unknown = sorted(set(tensors) - set(self.optimizers) - set(self.roles.ema_roles()))
        if unknown:
            raise UsageError(f"the checkpoint holds {unknown}, which this run does not train; resume with the same "
                             f"algo options and roles (e.g. the GAN head: algo.options.gan_generator_weight > 0)")
        for name in self.roles.trainable():
            if name not in tensors:
                raise UsageError(f"the checkpoint has no weights for role {name!r}")
            self.roles[name].load_trainable_state_dict(tensors[name])
            self.optimizers[name].load_state_dict(optimizers[name])
        for name, module in self.modules.items():
            if name in tensors:
                module.load_state_dict(tensors[name])
                self.optimizers[name].load_state_dict(optimizers[name])
            else:
                log.info("the checkpoint has no %r; it starts fresh", name)
        for name in self.roles.ema_roles():
            if name in tensors:
                self.roles[name].load_trainable_state_dict(tensors[name])
            else:  # an EMA copy added on resume starts from its role's current weights
                log.info("the checkpoint has no EMA role %r; it starts as a copy of %r", name,
                         self.roles.specs[name].ema_of)
                self.roles.update_ema(name, decay=0.0)


def optimizer_settings(spec: RoleSpec, train: TrainSection) -> OptimizerSettings:
    """A role's optimiser: its own fields where set, `train.*` otherwise."""
    def pick(name):
        value = getattr(spec, name)
        return getattr(train, name) if value is None else value

    return OptimizerSettings(lr=pick("lr"), betas=tuple(pick("betas")), weight_decay=pick("weight_decay"),
                             warmup_steps=pick("warmup_steps"), grad_clip=pick("grad_clip"))


# ------------------------------------------------------------------------------------------- registry

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to `rlfew train --algo NAME` (algos/<name>.py, or any module the
    caller imports first)."""
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__qualname__}.Options must be a dataclass, got {cls.Options!r}")
    registered = METHODS.get(cls.name)
    if registered is not None and registered.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is taken by {registered.__qualname__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """A method by its registered name (algos/<name>.py is imported on first use, then every algos module), or by a `package.module:Class`
    path to a Method subclass in the user's own code (importable wherever learners run)."""
    if name not in METHODS and ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"algo.name: cannot import method {name!r} ({err})") from None
        if not (isinstance(target, type) and issubclass(target, Method)):
            raise ConfigError(f"algo.name: {name!r} is not a Method subclass")
        METHODS[name] = target
    if name not in METHODS:
        try:
            importlib.import_module(f"rlfew.algos.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"rlfew.algos.{name}":
                raise
    allowed = available_methods()  # a module may register several methods (algos/tdm_r1.py: tdm_r1 and tdm)
    if name not in METHODS:
        raise ConfigError(f"algo.name: unknown method {name!r}; allowed: {', '.join(allowed)}")
    return METHODS[name]


def available_methods() -> list[str]:
    """Registered methods, after importing every module of rlfew.algos (each registers its own)."""
    import rlfew.algos

    for module in pkgutil.iter_modules(rlfew.algos.__path__):
        importlib.import_module(f"rlfew.algos.{module.name}")
    return sorted(METHODS)


def resolve_algo_options(cfg: TrainConfig) -> Any:
    """`cfg.algo.options` validated against the method's options dataclass (errors name algo.options.<key>)."""
    method_cls = get_method(cfg.algo.name)
    moved = sorted(set(cfg.algo.options) & set(method_cls.moved_options))
    if moved:
        raise ConfigError(f"'algo.options.{moved[0]}' has moved: use {method_cls.moved_options[moved[0]]}")
    return config_from_dict(method_cls.Options, cfg.algo.options, prefix="algo.options")


@dataclass
class ResolvedMethod:
    cls: type[Method]
    options: Any
    spec: MethodSpec
    roles: dict[str, RoleSpec] = field(default_factory=dict)  # the spec's table with cfg.roles applied


def resolve_method(cfg: TrainConfig) -> ResolvedMethod:
    """Everything about the method that can be checked without loading a model; errors name the config key."""
    method_cls = get_method(cfg.algo.name)
    options = resolve_algo_options(cfg)
    spec = method_cls.spec(cfg, options)
    roles = merge_role_specs(spec.roles, cfg.roles, cfg.algo.name)
    method_cls.check_roles(roles, options)
    if spec.rewards == "workers" and not cfg.reward:
        raise ConfigError(f"reward: method {cfg.algo.name!r} trains on rewards; give one, e.g. --reward world")
    if spec.advantages is not None and cfg.train.group_size < 2:
        raise ConfigError(f"train.group_size: method {cfg.algo.name!r} normalises rewards within a prompt's group, "
                          f"which needs at least 2 images per prompt, got {cfg.train.group_size}; set e.g. "
                          f"train.group_size=8")
    if cfg.runtime.max_staleness > spec.max_staleness:
        raise ConfigError(f"runtime.max_staleness: method {cfg.algo.name!r} accepts rollouts at most "
                          f"{spec.max_staleness} update(s) stale, got {cfg.runtime.max_staleness}")
    return ResolvedMethod(method_cls, options, spec, roles)


def build_method(cfg: TrainConfig, reward=None) -> Method:
    """The method of `cfg` on freshly built roles, as every learner builds it: the run seed fixes the initial
    LoRA weights (equal on every rank); an in-learner reward is loaded from `cfg.reward` unless given."""
    resolved = resolve_method(cfg)
    device = resolve_device(cfg.model.device)
    torch.manual_seed(cfg.run.seed)
    roles = build_roles(cfg.model.source, resolved.roles, teacher_source=cfg.teacher.source,
                        student_source=cfg.generator.source, dtype=cfg.model.dtype, device=device)
    if resolved.spec.rewards == "in_learner" and reward is None and cfg.reward:
        from rlfew.rewards import load

        reward = load(cfg.reward).to(device)
    return resolved.cls(roles, resolved.options, cfg, reward)
