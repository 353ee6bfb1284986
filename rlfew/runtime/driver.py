"""The driver of `rlfew train`: one controller over Learner / RolloutWorker / RewardWorker actors.

One iteration: prompts → rollout (the learner itself when colocated, rollout workers when disaggregated)
→ rewards from reward workers (for methods that use them, and for logging when rewards are configured)
→ learner.train → weight sync → log → sample grids → checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from rlfew.config import TrainConfig, config_to_dict, default_run_name
from rlfew.errors import UsageError
from rlfew.images import to_uint8
from rlfew.method import get_method
from rlfew.run import RunDir
from rlfew.runtime.workers import (SAMPLES_STREAM, Learner, PromptSource, RewardWorker, RolloutWorker,
                                   step_seed)

log = logging.getLogger(__name__)

ACTOR_RETRIES = 4


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row (train.max_nonfinite_steps)."""


class _Actor:
    """A uniform call shape for in-process objects and Ray actors: `call` returns a value or an ObjectRef,
    `fetch` resolves either."""

    def __init__(self, cls, args: tuple, ray_options: dict[str, Any] | None, backend: str):
        self.cls, self.args, self.backend = cls, args, backend
        if backend == "ray":
            import ray

            self.handle = ray.remote(cls).options(max_restarts=ACTOR_RETRIES, **(ray_options or {})).remote(*args)
        else:
            self.handle = cls(*args)

    def call(self, method: str, *args, **kwargs):
        if self.backend == "ray":
            return getattr(self.handle, method).remote(*args, **kwargs)
        return getattr(self.handle, method)(*args, **kwargs)

    def kill(self) -> None:
        if self.backend == "ray":
            import ray

            ray.kill(self.handle)

    def fetch(self, value):
        if self.backend == "ray":
            import ray

            return ray.get(value)
        return value


def _is_actor_death(err: Exception) -> bool:
    try:
        from ray.exceptions import RayActorError
    except ImportError:
        return False
    return isinstance(err, RayActorError)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.backend = cfg.runtime.backend
        self.placement = cfg.runtime.placement
        if self.placement == "disaggregated" and cfg.runtime.num_rollout_workers < 1:
            raise UsageError("runtime.num_rollout_workers must be >= 1 with runtime.placement=disaggregated")
        name = cfg.run.name or default_run_name(cfg)
        cfg.run.name = name
        self.run_dir = RunDir.create(cfg.run.output_dir, name, cfg, resume=cfg.run.resume is not None)
        self.resume_from = self.run_dir.resume_checkpoint(cfg.run.resume)
        self.prompts = PromptSource(cfg.train.prompts, cfg.run.seed)
        self.sample_prompts = PromptSource(cfg.eval.prompts, cfg.run.seed).batch(0, 8)
        self.cfg_dict = config_to_dict(cfg)
        self.learners: list[_Actor] = []
        self.rollout_workers: list[_Actor] = []
        self.reward_workers: dict[str, _Actor] = {}
        self.weights_version = -1

    # ---- actors --------------------------------------------------------------------------------------
    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        env = {"env_vars": {k: os.environ.get(k, v) for k, v in
                            {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                             "RAY_AUTH_MODE": "disabled"}.items()}}
        address = self.cfg.runtime.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
            return
        # A local Ray gets enough logical CPUs for one CPU per actor; physical cores are shared.
        needed = self.cfg.runtime.num_learners + len(self.cfg.reward) + (
            self.cfg.runtime.num_rollout_workers if self.placement == "disaggregated" else 0)
        num_cpus = max(self.cfg.runtime.num_cpus or os.cpu_count() or 1, needed)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)

    def _gpu_options(self) -> dict[str, Any]:
        import torch

        wants_gpu = self.cfg.model.device in ("auto", "cuda") and torch.cuda.is_available()
        return {"num_gpus": 1} if wants_gpu else {"num_cpus": 1}

    def start(self) -> None:
        if self.backend == "ray":
            self._init_ray()
        world = self.cfg.runtime.num_learners
        if world > 1 and self.backend != "ray":
            raise UsageError("runtime.num_learners > 1 needs runtime.backend=ray (one process per learner)")
        dist_url = f"tcp://127.0.0.1:{_free_port()}" if world > 1 else None
        self.learners = [_Actor(Learner, (self.cfg_dict, rank, world, dist_url), self._gpu_options(), self.backend)
                         for rank in range(world)]
        if self.placement == "disaggregated":
            self.rollout_workers = [_Actor(RolloutWorker, (self.cfg_dict, i), self._gpu_options(), self.backend)
                                    for i in range(self.cfg.runtime.num_rollout_workers)]
        # Methods that hold their reward in the learner report it themselves; no second copy in a worker.
        logged_rewards = [] if get_method(self.cfg.algo.name).reward_in_learner else self.cfg.reward
        for entry in logged_rewards:
            ray_options = {"num_cpus": 1, **({"runtime_env": entry.runtime_env} if entry.runtime_env else {})}
            self.reward_workers[entry.name] = _Actor(RewardWorker, (entry.name, entry.options), ray_options,
                                                     self.backend)
        lead = self.learners[0]
        if self.resume_from is not None:
            from rlfew.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(self.resume_from)
            for learner in self.learners:
                learner.fetch(learner.call("load_checkpoint_state", checkpoint.tensors, checkpoint.state))
            self.start_step = checkpoint.step
            log.info("resumed from %s (step %d)", self.resume_from, checkpoint.step)
        else:
            self.start_step = 0
        self.weights = lead.call("generator_state")
        self._sync_rollout_weights(self.start_step)

    def _sync_rollout_weights(self, version: int) -> None:
        """Push the lead learner's generator weights (an object-store reference under Ray) to rollout workers."""
        refs = [w.call("set_generator_state", self.weights, version) for w in self.rollout_workers]
        for worker, ref in zip(self.rollout_workers, refs):
            worker.fetch(ref)
        self.weights_version = version

    def _with_restarts(self, actor: _Actor, what: str, call, on_restart=None):
        """Run `call()`; if the actor died, wait for Ray to restart it, re-prepare it (`on_restart`, e.g. re-sync
        weights) and re-run the batch."""
        for attempt in range(ACTOR_RETRIES + 1):
            try:
                if attempt > 0 and on_restart is not None:
                    on_restart()
                return actor.fetch(call())
            except Exception as err:  # noqa: BLE001 - only actor deaths are retried, the rest re-raised
                if not _is_actor_death(err) or attempt == ACTOR_RETRIES:
                    raise
                log.warning("%s actor died or is restarting (%s); re-running its batch (attempt %d/%d)",
                            what, type(err).__name__, attempt + 1, ACTOR_RETRIES)
                time.sleep(2.0 * (attempt + 1))

    # ---- one iteration -------------------------------------------------------------------------------
    def iteration(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        world = len(self.learners)
        prompts = self.prompts.batch(step, cfg.train.batch_size * world)
        shards = [prompts[rank::world] for rank in range(world)]
        rollout_start = time.perf_counter()
        decode = bool(self.reward_workers)  # images are only needed by reward workers
        if self.placement == "colocated":
            outputs = [learner.call("rollout", step, shard, decode) for learner, shard in zip(self.learners, shards)]
            outputs = [learner.fetch(out) for learner, out in zip(self.learners, outputs)]
            images = np.concatenate([o["images"] for o in outputs]) if decode else None
            trajectories = [None] * world
        else:
            worker = self.rollout_workers[step % len(self.rollout_workers)]
            trajectories = [self._with_restarts(worker, "rollout",
                                                lambda s=shard: worker.call("rollout", step, s, decode),
                                                on_restart=lambda: self._sync_rollout_weights(self.weights_version))
                            for shard in shards]
            images = np.concatenate([to_uint8(t.images) for t in trajectories]) if decode else None
        metrics = {"time/rollout": time.perf_counter() - rollout_start}
        rewards = self._score(images, [p for shard in shards for p in shard]) if decode else {}
        for name, values in rewards.items():
            metrics[f"reward/{name}"] = float(np.mean(values))
        train_start = time.perf_counter()
        offsets = np.cumsum([0] + [len(s) for s in shards])
        refs = [learner.call("train", step, trajectory,
                             {n: v[offsets[r]:offsets[r + 1]] for n, v in rewards.items()} or None)
                for r, (learner, trajectory) in enumerate(zip(self.learners, trajectories))]
        results = [learner.fetch(ref) for learner, ref in zip(self.learners, refs)]
        metrics["time/train"] = time.perf_counter() - train_start
        metrics.update(results[0])
        if self.rollout_workers:
            self.weights = self.learners[0].call("generator_state")
            self._sync_rollout_weights(step + 1)
        return metrics

    def _score(self, images: np.ndarray, prompts: list[str]) -> dict[str, list[float]]:
        refs = {name: worker.call("score", images, prompts) for name, worker in self.reward_workers.items()}
        scores = {}
        for name, worker in self.reward_workers.items():
            try:
                scores[name] = worker.fetch(refs[name])
            except Exception as err:  # noqa: BLE001 - a dead worker is restarted by Ray; re-score the batch
                if not _is_actor_death(err):
                    raise
                scores[name] = self._with_restarts(worker, f"reward {name}",
                                                   lambda w=worker: w.call("score", images, prompts))
        return scores

    # ---- the loop ------------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> None:
        lead = self.learners[0]
        tensors, state = lead.fetch(lead.call("checkpoint_state"))
        self.run_dir.save_checkpoint(step, tensors, state)

    def log_samples(self, logger, step: int) -> None:
        lead = self.learners[0]
        images = lead.fetch(lead.call("sample_images", self.sample_prompts, step_seed(self.cfg.run.seed, 0, SAMPLES_STREAM)))
        logger.log_samples(step, images, self.sample_prompts)

    def run(self) -> int:
        from tqdm import tqdm

        cfg = self.cfg
        self.start()
        resumed = self.resume_from is not None
        logger = self.run_dir.metrics_logger(resumed_step=self.start_step if resumed else None, fresh=not resumed)
        nonfinite_in_a_row = 0
        interval: dict[str, list[float]] = {}
        step = self.start_step
        progress = tqdm(total=cfg.train.steps, initial=step, desc=f"rlfew train {cfg.algo.name}", unit="it",
                        dynamic_ncols=True, disable=None)
        try:
            with _sigint_as_keyboard_interrupt():
                if step == 0 and cfg.train.sample_every > 0:
                    self.log_samples(logger, 0)
                while step < cfg.train.steps:
                    metrics = self.iteration(step)
                    step += 1
                    # A non-finite loss or gradient means the method skipped that update.
                    losses = {k: v for k, v in metrics.items() if "loss" in k or "grad_norm" in k}
                    if any(not math.isfinite(v) for v in losses.values()):
                        nonfinite_in_a_row += 1
                        log.warning("step %d: non-finite loss %s; the update was skipped (%d in a row)", step,
                                    losses, nonfinite_in_a_row)
                        if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                            raise NonFiniteLossError(
                                f"aborting: {nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite_steps)"
                                f"; the last good checkpoint is kept in {self.run_dir.checkpoints_dir}")
                    else:
                        nonfinite_in_a_row = 0
                    for key, value in metrics.items():
                        interval.setdefault(key, []).append(value)
                    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                        # Means over the interval: under TTUR, generator metrics exist only on some steps.
                        logger.log(step, {key: float(np.mean(values)) for key, values in interval.items()})
                        interval = {}
                    progress.update(1)
                    progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                                          if "loss" in k or k.startswith("reward")})
                    if cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0:
                        self.log_samples(logger, step)
                    if nonfinite_in_a_row == 0 and (step % cfg.train.save_every == 0 or step == cfg.train.steps):
                        self.checkpoint(step)
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a checkpoint and exiting", step)
            if nonfinite_in_a_row == 0 and step > self.start_step:
                self.checkpoint(step)
            return 130
        finally:
            progress.close()
            logger.close()
            self.shutdown()
        print(f"run directory: {self.run_dir.path}  (tensorboard --logdir {self.run_dir.path.parent})")
        return 0

    def shutdown(self) -> None:
        """Leave the process group and release every actor (and so its CPUs/GPUs) of this run."""
        actors = [*self.learners, *self.rollout_workers, *self.reward_workers.values()]
        if len(self.learners) > 1:
            for learner in self.learners:
                try:
                    learner.fetch(learner.call("shutdown"))
                except Exception:  # noqa: BLE001 - best effort while tearing down
                    log.debug("learner shutdown failed", exc_info=True)
        for actor in actors:
            actor.kill()


@contextmanager
def _sigint_as_keyboard_interrupt():
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

