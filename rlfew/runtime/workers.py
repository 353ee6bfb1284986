"""The actor classes of a run: Learner, RolloutWorker, RewardWorker.

They are plain Python classes: the driver wraps them with `ray.remote` (the default runtime, one process per
actor) or calls them in-process (`runtime.backend=inprocess`, used by tests). Everything random is derived
from (seed, step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from rlfew.commands.common import resolve_device
from rlfew.config import TrainConfig, config_from_dict, resolve_algo_options
from rlfew.images import to_uint8

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, stream: int) -> int:
    """Independent, reproducible seeds per (run seed, step, stream)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


ROLLOUT_STREAM, METHOD_STREAM, PROMPT_STREAM, SAMPLES_STREAM = range(4)


def _pin_threads() -> None:
    # Actors share a few cores; one intra-op thread each avoids oversubscription (see OFFLINE.md).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


class PromptSource:
    """Prompts for a step, drawn with replacement from a fixed list by a (seed, step) generator."""

    def __init__(self, spec: str, seed: int):
        from rlfew.commands.common import read_prompts

        self.prompts = read_prompts(spec, None)
        self.seed = seed

    def batch(self, step: int, size: int) -> list[str]:
        rng = np.random.default_rng(step_seed(self.seed, step, PROMPT_STREAM))
        return [self.prompts[i] for i in rng.integers(0, len(self.prompts), size)]


def _generator_roles(cfg: TrainConfig, **role_spec):
    from rlfew.models import build_roles

    return build_roles(cfg.model.source, generator_source=cfg.generator.source,
                       generator_lora_rank=cfg.generator.lora_rank, lora_alpha=cfg.generator.lora_alpha,
                       lora_targets=cfg.generator.lora_targets, dtype=cfg.model.dtype,
                       device=resolve_device(cfg.model.device), **role_spec)


def _rollout(roles, cfg: TrainConfig, prompts: list[str], seed: int, sampler, stochastic_steps, decode: bool):
    from rlfew.sampling import sample

    adapter = roles.adapter
    rng = torch.Generator(adapter.device).manual_seed(seed)
    resolution = cfg.model.resolution or adapter.default_resolution
    with torch.no_grad():
        cond = adapter.encode_prompts(prompts)
        return sample(roles.generator, cond, adapter.sigma_grid(cfg.generator.steps, cfg.generator.shift, resolution), sampler,
                      prompts=prompts, generator=rng, latent_shape=adapter.latent_shape(resolution),
                      stochastic_steps=stochastic_steps, decode=decode)


class Learner:
    """Holds every role and the method; rolls out itself when colocated. One per device; several learners form
    a torch.distributed group and average gradients."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int = 0, world_size: int = 1, dist_url: str | None = None):
        from rlfew.method import get_method

        _pin_threads()
        self.cfg = config_from_dict(TrainConfig, cfg_dict)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size)
        torch.manual_seed(self.cfg.run.seed)  # identical initial LoRA weights on every rank
        method_cls = get_method(self.cfg.algo.name)
        options = resolve_algo_options(self.cfg)
        self.roles = _generator_roles(self.cfg, **method_cls.role_spec(self.cfg, options))
        reward = None
        if self.cfg.reward and method_cls.reward_in_learner:
            from rlfew.rewards import load

            # runtime_env belongs to a reward worker's process, not to the reward spec
            reward = load([{"name": e.name, "weight": e.weight, "options": e.options} for e in self.cfg.reward])
            reward.to(self.roles.adapter.device)
        self.method = method_cls(self.roles, options, self.cfg, reward)
        self.method_cls, self.options = method_cls, options
        self._last_rollout = None

    # ---- rollouts --------------------------------------------------------------------------------------
    def rollout(self, step: int, prompts: list[str], decode: bool) -> dict[str, Any]:
        """Colocated rollout with the learner's own generator; keeps the trajectory for `train`, returns only
        what the driver needs (uint8 images for reward workers, when `decode`)."""
        seed = step_seed(self.cfg.run.seed, step, ROLLOUT_STREAM) + self.rank
        self._last_rollout = _rollout(self.roles, self.cfg, prompts, seed,
                                      self.method_cls.rollout_sampler(self.cfg, self.options),
                                      self.method_cls.stochastic_steps(self.cfg, self.options), decode=decode)
        return {"images": to_uint8(self._last_rollout.images) if decode else None}

    def train(self, step: int, trajectory=None, rewards: dict[str, list[float]] | None = None) -> dict[str, float]:
        from rlfew.method import Batch

        trajectory = trajectory if trajectory is not None else self._last_rollout
        if trajectory is None:
            raise RuntimeError("train() without a trajectory: call rollout() first or pass one")
        trajectory = trajectory.to(self.roles.adapter.device)
        if rewards:
            trajectory.extras.update({name: torch.tensor(values) for name, values in rewards.items()})
        cond = self.roles.adapter.encode_prompts(trajectory.prompts)
        rng = torch.Generator(self.roles.adapter.device).manual_seed(step_seed(self.cfg.run.seed, step, METHOD_STREAM))
        metrics = self.method.train_step(Batch(step=step, trajectory=trajectory, cond=cond, rng=rng))
        self._last_rollout = None
        return {k: float(v) for k, v in metrics.items()}

    # ---- weights and state -----------------------------------------------------------------------------
    def generator_state(self) -> dict[str, torch.Tensor]:
        """What rollout workers need to mirror the generator (LoRA weights only when LoRA)."""
        return {k: v.detach().cpu() for k, v in self.roles.generator.trainable_state_dict().items()}

    def checkpoint_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        state = self.method.state_dict()
        return state["tensors"], state["state"]

    def load_checkpoint_state(self, tensors, state) -> None:
        self.method.load_state_dict({"tensors": tensors, "state": state})

    def sample_images(self, prompts: list[str], seed: int, steps: int | None = None) -> np.ndarray:
        """Deterministic few-step samples of the current generator (grids and eval)."""
        from rlfew.sampling import Deterministic, sample

        adapter = self.roles.adapter
        rng = torch.Generator(adapter.device).manual_seed(seed)
        resolution = self.cfg.model.resolution or adapter.default_resolution
        with torch.no_grad():
            trajectory = sample(self.roles.generator, adapter.encode_prompts(prompts),
                                adapter.sigma_grid(steps or self.cfg.generator.steps, self.cfg.generator.shift, resolution),
                                Deterministic(), prompts=prompts, generator=rng,
                                latent_shape=adapter.latent_shape(resolution))
        return to_uint8(trajectory.images)

    def shutdown(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class RolloutWorker:
    """A generator-only copy that samples trajectories with weights synced from the learner."""

    def __init__(self, cfg_dict: dict[str, Any], worker_index: int = 0):
        from rlfew.method import get_method

        _pin_threads()
        self.cfg = config_from_dict(TrainConfig, cfg_dict)
        torch.manual_seed(self.cfg.run.seed)
        method_cls = get_method(self.cfg.algo.name)
        options = resolve_algo_options(self.cfg)
        self.roles = _generator_roles(self.cfg)
        self.sampler = method_cls.rollout_sampler(self.cfg, options)
        self.stochastic_steps = method_cls.stochastic_steps(self.cfg, options)
        self.worker_index = worker_index
        self.weights_version = -1

    def set_generator_state(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.roles.generator.load_trainable_state_dict(state)
        self.weights_version = version
        return version

    def rollout(self, step: int, prompts: list[str], decode: bool):
        seed = step_seed(self.cfg.run.seed, step, ROLLOUT_STREAM)
        trajectory = _rollout(self.roles, self.cfg, prompts, seed, self.sampler, self.stochastic_steps, decode=decode)
        return trajectory.to("cpu")


class RewardWorker:
    """Scores uint8 images with one reward (its own process, optionally its own Ray runtime_env)."""

    def __init__(self, name: str, options: dict[str, Any] | None = None, device: str = "cpu"):
        from rlfew.rewards import load

        _pin_threads()
        self.reward = load(name, **(options or {}))
        self.device = device

    def score(self, images: np.ndarray, prompts: list[str]) -> list[float]:
        # np.array copies: arrays from Ray's object store are read-only.
        tensor = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        with torch.no_grad():
            return self.reward.score(tensor, prompts).float().cpu().tolist()

    def pid(self) -> int:
        return os.getpid()

