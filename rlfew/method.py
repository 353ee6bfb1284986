"""The Method abstraction shared by distillation and RL (DMD2, DMDR, GRPO, TDM-R1, ...).

A method declares the roles it needs and how rollouts are drawn, owns its optimisers and update ratios, and
turns one `Batch` (a rollout of the current generator plus the learner's RNG) into parameter updates. The
trainer never looks inside: it rolls out, optionally scores, calls `train_step`, syncs weights, logs and
checkpoints (`state_dict` / `load_state_dict` carry everything a bit-exact resume needs).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlfew.config import TrainConfig
from rlfew.models import Conditioning, ModelRoles
from rlfew.sampling import Sampler, Trajectory, make_sampler

METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to `rlfew train --algo NAME` and register its options."""
    from rlfew.config import register_algo_options

    METHODS[cls.name] = cls
    register_algo_options(cls.name, cls.Options)
    return cls


def get_method(name: str) -> type["Method"]:
    import importlib

    from rlfew.errors import ConfigError

    if name not in METHODS:
        try:
            importlib.import_module(f"rlfew.algos.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"rlfew.algos.{name}":
                raise
    if name not in METHODS:
        raise ConfigError(f"algo.name: unknown method {name!r}; allowed: {', '.join(sorted(available_methods()))}")
    return METHODS[name]


def available_methods() -> list[str]:
    import pkgutil

    import rlfew.algos

    return sorted({m.name for m in pkgutil.iter_modules(rlfew.algos.__path__) if not m.name.startswith("_")}
                  | set(METHODS))


@dataclass
class Batch:
    """One iteration's input to `Method.train_step`."""

    step: int  # iteration index, 0-based
    trajectory: Trajectory  # rollout of the current generator (or one update stale when disaggregated)
    cond: Conditioning  # encoded prompts of `trajectory.prompts`, on the learner's device
    rng: torch.Generator  # the learner's generator for timesteps and noise (checkpointed with the run)


class Method(abc.ABC):
    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass; its fields are `algo.options` in the config
    uses_rewards: ClassVar[bool] = False  # the trainer scores each rollout before train_step (GRPO, TDM-R1)
    reward_in_learner: ClassVar[bool] = False  # the learner holds the (differentiable) reward itself (DMDR)

    def __init__(self, roles: ModelRoles, options: Any, cfg: TrainConfig, reward=None):
        self.roles = roles
        self.options = options
        self.cfg = cfg
        self.reward = reward

    @classmethod
    @abc.abstractmethod
    def role_spec(cls, cfg: TrainConfig, options: Any) -> dict[str, Any]:
        """Keyword arguments for `rlfew.models.build_roles` beyond the model sources and generator LoRA."""

    # Class-level so rollout workers can draw rollouts without building the method (and its optimisers).
    @classmethod
    def rollout_sampler(cls, cfg: TrainConfig, options: Any) -> Sampler:
        """The kernel rollouts use; DMD-style methods re-noise x̂0 with fresh noise (CPS η=1)."""
        gen = cfg.generator
        return make_sampler(gen.sampler, eta=gen.eta, noise_level=gen.noise_level)

    @classmethod
    def check_inputs(cls, cfg: TrainConfig, options: Any) -> None:
        """Checks that read the filesystem (data folders), run once by `rlfew train` before the run directory is
        written; may normalise paths in `cfg.algo.options` for workers elsewhere. Default: nothing to check."""

    @classmethod
    def stochastic_steps(cls, cfg: TrainConfig, options: Any) -> list[int] | None:
        """Steps that use the rollout kernel; the others are deterministic. None: all of them."""
        return None

    @abc.abstractmethod
    def train_step(self, batch: Batch) -> dict[str, float]:
        """Update parameters from one batch; returns scalar metrics (losses, grad norms, ...)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """{"tensors": {group: {name: Tensor}}, "state": JSON-able with optimiser states} for checkpoints."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients across the learners' torch.distributed group (no-op with one learner).

    Methods call this between backward and the optimiser step, so every rank applies the same update.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)  # every rank must join every all-reduce
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)


def all_ranks_finite(value: float) -> bool:
    """Whether `value` is finite on every learner; all ranks must take the same branch before a collective."""
    import math

    import torch.distributed as dist

    finite = math.isfinite(value)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return finite
    flag = torch.tensor([1.0 if finite else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)
