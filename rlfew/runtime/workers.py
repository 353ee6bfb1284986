"""The actor classes of a run: Learner, RolloutWorker, RewardWorker.

They are plain Python classes: the driver wraps them with `ray.remote` (the default runtime, one process per
actor) or calls them in-process (`runtime.backend=inprocess`, used by tests). A rollout returns two objects, the
trajectory (kept as an object-store reference and handed to the learner that trains on it) and its uint8 images
(for reward workers; None when nothing is scored), so colocated and disaggregated placements share one data path.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from rlfew.config import TrainConfig, config_from_dict
from rlfew.images import to_uint8
from rlfew.method import Batch, RolloutSpec, build_method, resolve_method
from rlfew.models import Role, build_roles, resolve_device
from rlfew.runtime.prompts import PromptBatch
from rlfew.runtime.seeds import (METHOD_RANK_STREAM, METHOD_SHARED_STREAM, ROLLOUT_STREAM, seeded_generator,
                                 step_seed)
from rlfew.sampling import Deterministic, Trajectory, sample

log = logging.getLogger(__name__)


class StaleRolloutWeights(RuntimeError):
    """A rollout actor holds other generator weights than the driver expects (e.g. Ray restarted it empty); the
    driver re-syncs it and re-runs the shard."""


def _check_weights(held: int, expected: int) -> None:
    if held != expected:
        raise StaleRolloutWeights(f"rollout actor holds generator weights version {held}, expected {expected}")


def _pin_threads() -> None:
    # Actors share a few cores; one intra-op thread each avoids oversubscription (see OFFLINE.md).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def draw_rollout(generator: Role, cfg: TrainConfig, spec: RolloutSpec, step: int, shard: PromptBatch,
                 shard_index: int, decode: bool, weights_version: int) -> tuple[Trajectory, np.ndarray | None]:
    """One shard's rollout, seeded by (run seed, step, shard): the same noise whichever actor draws it.
    Returns the trajectory on the CPU (without images) and its uint8 images when `decode`."""
    adapter = generator.adapter
    rng = seeded_generator(adapter.device, step_seed(cfg.run.seed, step, ROLLOUT_STREAM, shard_index))
    resolution = cfg.model.resolution or adapter.default_resolution
    shape = adapter.latent_shape(resolution)
    group_ids = torch.tensor(shard.group_ids)  # a copy: arrays from Ray's object store are read-only
    if spec.shared_noise_in_group:
        _, group_index = torch.unique(group_ids, return_inverse=True)
        noise = torch.randn((int(group_index.max()) + 1, *shape), generator=rng, device=rng.device)[group_index]
    else:
        noise = torch.randn((len(shard), *shape), generator=rng, device=rng.device)
    with torch.no_grad():
        trajectory = sample(generator, adapter.encode_prompts(shard.prompts),
                            adapter.sigma_grid(cfg.generator.steps, cfg.generator.shift, resolution), spec.sampler,
                            prompts=shard.prompts, noise=noise.to(adapter.device), generator=rng,
                            stochastic_steps=spec.stochastic_steps, group_ids=group_ids, decode=decode,
                            weights_version=weights_version)
    images = to_uint8(trajectory.images) if decode else None
    trajectory.images = None  # the learner trains on latents; images travel separately, as uint8
    return trajectory.to("cpu"), images


def attach_scores(trajectory: Trajectory, scores: dict[str, np.ndarray] | None, rewards: np.ndarray | None,
                  advantages: np.ndarray | None, advantage_valid: np.ndarray | None) -> Trajectory:
    """Put a shard's slice of the batch's scores, weighted rewards and advantages on its trajectory (np.array
    copies: arrays from Ray's object store are read-only)."""
    device = trajectory.states.device
    if scores:
        trajectory.scores = {name: torch.as_tensor(np.array(v), device=device) for name, v in scores.items()}
        trajectory.rewards = torch.as_tensor(np.array(rewards), device=device)
    if advantages is not None:
        trajectory.advantages = torch.as_tensor(np.array(advantages), device=device)
        trajectory.advantage_valid = torch.as_tensor(np.array(advantage_valid), device=device)
    return trajectory


def learner_batch(cfg: TrainConfig, generator: Role, step: int, trajectory: Trajectory, rank: int) -> Batch:
    """The Batch a learner of `rank` hands its method: encoded prompts, the shared and the per-rank streams."""
    device = generator.adapter.device
    return Batch(step=step, trajectory=trajectory, cond=generator.adapter.encode_prompts(trajectory.prompts),
                 shared_rng=seeded_generator(device, step_seed(cfg.run.seed, step, METHOD_SHARED_STREAM)),
                 rng=seeded_generator(device, step_seed(cfg.run.seed, step, METHOD_RANK_STREAM, rank)),
                 micro_batch_size=cfg.train.micro_batch_size)


class Learner:
    """Holds every role and the method; rolls out itself when colocated. One per device; several learners form
    a torch.distributed group and average gradients."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int = 0, world_size: int = 1, dist_url: str | None = None):
        _pin_threads()
        self.cfg = config_from_dict(TrainConfig, cfg_dict)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size)
        self.spec = resolve_method(self.cfg).spec
        self.method = build_method(self.cfg)
        self.generator = self.method.roles["generator"]
        self.weights_version = 0  # updates applied to the generator (a resumed run starts at its checkpoint's)

    def rollout(self, step: int, shard: PromptBatch, shard_index: int, decode: bool, weights_version: int):
        _check_weights(self.weights_version, weights_version)
        return draw_rollout(self.generator, self.cfg, self.spec.rollout(step), step, shard, shard_index, decode,
                            self.weights_version)

    def train(self, step: int, trajectory: Trajectory, scores: dict[str, np.ndarray] | None = None,
              rewards: np.ndarray | None = None, advantages: np.ndarray | None = None,
              advantage_valid: np.ndarray | None = None) -> dict[str, Any]:
        """One update on this learner's shard; scores and advantages were computed on the whole batch."""
        trajectory = trajectory.to(self.generator.adapter.device)
        attach_scores(trajectory, scores, rewards, advantages, advantage_valid)
        result = self.method.train_step(learner_batch(self.cfg, self.generator, step, trajectory, self.rank))
        self.weights_version = step + 1
        return {"metrics": {k: float(v) for k, v in result.metrics.items()}, "skipped": result.skipped}

    # ---- weights and state -----------------------------------------------------------------------------
    def generator_state(self) -> dict[str, torch.Tensor]:
        """What rollout workers need to mirror the generator (LoRA weights only when LoRA): a copy, which the driver
        may keep while training goes on (an in-process learner would otherwise hand out its live tensors)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.generator.trainable_state_dict().items()}

    def checkpoint_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        state = self.method.state_dict()
        return state["tensors"], state["state"]

    def load_checkpoint_state(self, tensors, state, step: int) -> None:
        self.method.load_state_dict({"tensors": tensors, "state": state})
        self.weights_version = step

    def sample_images(self, prompts: list[str], seed: int, steps: int | None = None) -> np.ndarray:
        """Deterministic few-step samples of the current generator (grids and eval)."""
        adapter = self.generator.adapter
        resolution = self.cfg.model.resolution or adapter.default_resolution
        with torch.no_grad():
            trajectory = sample(self.generator, adapter.encode_prompts(prompts),
                                adapter.sigma_grid(steps or self.cfg.generator.steps, self.cfg.generator.shift,
                                                   resolution),
                                Deterministic(), prompts=prompts, generator=seeded_generator(adapter.device, seed),
                                latent_shape=adapter.latent_shape(resolution))
        return to_uint8(trajectory.images)

    def shutdown(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class RolloutWorker:
    """A generator-only copy that samples trajectories with weights synced from the learner."""

    def __init__(self, cfg_dict: dict[str, Any]):
        _pin_threads()
        self.cfg = config_from_dict(TrainConfig, cfg_dict)
        resolved = resolve_method(self.cfg)
        self.spec = resolved.spec
        self.generator = build_roles(self.cfg.model.source, {"generator": resolved.roles["generator"]},
                                     teacher_source=self.cfg.teacher.source, student_source=self.cfg.generator.source,
                                     dtype=self.cfg.model.dtype, device=resolve_device(self.cfg.model.device)
                                     )["generator"]
        self.weights_version = -1

    def set_generator_state(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.generator.load_trainable_state_dict(state)
        self.weights_version = version
        return version

    def rollout(self, step: int, shard: PromptBatch, shard_index: int, decode: bool, weights_version: int):
        _check_weights(self.weights_version, weights_version)
        return draw_rollout(self.generator, self.cfg, self.spec.rollout(step), step, shard, shard_index, decode,
                            self.weights_version)


class RewardWorker:
    """Scores uint8 images with one reward (its own process, optionally its own Ray runtime_env)."""

    def __init__(self, name: str, options: dict[str, Any] | None = None, device: str = "cpu"):
        from rlfew.rewards import load

        _pin_threads()
        self.reward = load(name, **(options or {}))
        self.device = device

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        # np.array copies: arrays from Ray's object store are read-only.
        tensor = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        with torch.no_grad():
            return self.reward.score(tensor, prompts).double().cpu().numpy()
