"""The driver of `rlfew train`: one controller over Learner / RolloutWorker / RewardWorker actors.

One iteration (Trainer.iteration) is one visible data path:
prompts in groups → rollout (per-shard seeds, shards fanned out in parallel) → scores {name: Tensor[B]} from
reward workers → advantages on the whole batch → update on every learner → weight sync → log → grids → checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlfew.algos.advantages import Advantages, group_advantages
from rlfew.config import TrainConfig, config_to_dict, default_run_name
from rlfew.errors import UsageError
from rlfew.method import resolve_method
from rlfew.run import RunDir
from rlfew.runtime.prompts import PromptBatch, PromptSource
from rlfew.runtime.seeds import SAMPLES_STREAM, step_seed
from rlfew.runtime.workers import Learner, RewardWorker, RolloutWorker, StaleRolloutWeights

log = logging.getLogger(__name__)

ACTOR_RETRIES = 4
STALE_ROLLOUT_WEIGHTS = "stale_rollout_generator"  # checkpoint group: the weights the next rollout was drawn with


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

    def call(self, method: str, *args, num_returns: int = 1, **kwargs):
        """Run `method`; under Ray a reference (a list of `num_returns` references when it returns a tuple)."""
        if self.backend == "ray":
            remote = getattr(self.handle, method)
            if num_returns != 1:
                remote = remote.options(num_returns=num_returns)
            return remote.remote(*args, **kwargs)
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


def _is_rerunnable(err: Exception) -> bool:
    """An actor died (Ray restarts it) or came back without the current weights: re-prepare it, re-run its batch."""
    return _is_actor_death(err) or isinstance(err, StaleRolloutWeights)


def _is_actor_death(err: Exception) -> bool:
    try:
        from ray.exceptions import RayActorError
    except ImportError:
        return False
    return isinstance(err, RayActorError)


@dataclass
class Rollouts:
    """One step's rollout: per-shard trajectories (references under Ray) and the batch's uint8 images."""

    step: int
    trajectories: list[Any]
    images: np.ndarray | None
    weights_version: int  # updates the generator that drew them had taken


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.backend = cfg.runtime.backend
        self.placement = cfg.runtime.placement
        self.spec = resolve_method(cfg).spec
        # Rewards are scored by workers when the method trains on them, and for logging when a method that uses no
        # reward is given one; a method that holds its reward in the learner reports it itself.
        self.scored = bool(cfg.reward) and self.spec.rewards != "in_learner"
        self.prompts = PromptSource(cfg.train.prompts, cfg.run.seed)
        self.sample_prompts = PromptSource(cfg.eval.prompts, cfg.run.seed).groups(0, 8, 1).prompts
        name = cfg.run.name or default_run_name(cfg)
        cfg.run.name = name
        self.run_dir = RunDir.create(cfg.run.output_dir, name, cfg, resume=cfg.run.resume is not None)
        self.resume_from = self.run_dir.resume_checkpoint(cfg.run.resume)
        self.cfg_dict = config_to_dict(cfg)
        self.learners: list[_Actor] = []
        self.rollout_workers: list[_Actor] = []
        self.reward_workers: dict[str, _Actor] = {}
        self.weights = None  # the lead learner's generator state (a reference under Ray)
        self.weights_version = 0  # the version rollout workers were last sent
        self.previous_weights = None  # the state before it: what a rollout drawn one update stale ran on
        self.updates_done = 0  # updates the learners have applied
        self._pending_syncs: list[tuple[_Actor, Any]] = []
        self._prefetched: Rollouts | None = None

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
            self.rollout_workers = [_Actor(RolloutWorker, (self.cfg_dict,), self._gpu_options(), self.backend)
                                    for _ in range(self.cfg.runtime.num_rollout_workers)]
        if self.scored:
            for entry in self.cfg.reward:
                ray_options = {"num_cpus": 1, **({"runtime_env": entry.runtime_env} if entry.runtime_env else {})}
                self.reward_workers[entry.name] = _Actor(RewardWorker, (entry.name, entry.options), ray_options,
                                                         self.backend)
        self.start_step = 0
        stale_weights = None
        if self.resume_from is not None:
            from rlfew.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(self.resume_from)
            self.start_step = checkpoint.step
            stale_weights = checkpoint.tensors.pop(STALE_ROLLOUT_WEIGHTS, None)
            refs = [learner.call("load_checkpoint_state", checkpoint.tensors, checkpoint.state, checkpoint.step)
                    for learner in self.learners]
            for learner, ref in zip(self.learners, refs):
                learner.fetch(ref)
            log.info("resumed from %s (step %d)", self.resume_from, checkpoint.step)
        self.updates_done = self.start_step
        if stale_weights is not None and self.rollout_workers:
            # An uninterrupted run drew this step's rollout one update stale, while the last update ran: so does
            # the resumed one, from the weights the checkpoint kept for it.
            self.weights, self.weights_version = stale_weights, self.start_step - 1
            self._pending_syncs = [(w, w.call("set_generator_state", stale_weights, self.weights_version))
                                   for w in self.rollout_workers]
            self._prefetched = self._draw(self.start_step, self._shards(self.start_step))
        self.sync_weights(self.start_step)

    def sync_weights(self, version: int) -> None:
        """Push the lead learner's generator weights (an object-store reference under Ray) to rollout workers.
        Not awaited here: each worker applies them before its next rollout (actor calls run in order), which
        lets a rollout already queued (max_staleness 1) finish on the weights it started with."""
        if not self.rollout_workers:
            return
        lead = self.learners[0]
        self.previous_weights, self.weights = self.weights, lead.call("generator_state")
        self.weights_version = version
        self._pending_syncs += [(w, w.call("set_generator_state", self.weights, version)) for w in self.rollout_workers]

    def _with_restarts(self, actor: _Actor, what: str, call, on_restart=None):
        """Re-run a batch whose actor failed: re-prepare the actor (`on_restart`, e.g. re-sync weights; before every
        attempt, since Ray may already have restarted it), run `call()` and fetch its result; while the actor is dead
        or restarting, wait and try again. `call` may return a list of references: the last one is fetched (a
        rollout's images) and all of them are returned."""
        for attempt in range(ACTOR_RETRIES + 1):
            try:
                if on_restart is not None:
                    on_restart()
                refs = call()
                if isinstance(refs, list):
                    actor.fetch(refs[-1])
                    return refs
                return actor.fetch(refs)
            except Exception as err:  # noqa: BLE001 - only dead or stale actors are retried, the rest re-raised
                if not _is_rerunnable(err) or attempt == ACTOR_RETRIES:
                    raise
                log.warning("%s actor died, is restarting or lost its weights (%s); re-running its batch "
                            "(attempt %d/%d)", what, type(err).__name__, attempt + 1, ACTOR_RETRIES)
                time.sleep(2.0 * (attempt + 1))

    # ---- one iteration -------------------------------------------------------------------------------
    def iteration(self, step: int) -> tuple[dict[str, float], bool]:
        """One step; returns (metrics, whether an update was skipped)."""
        cfg = self.cfg
        started = time.perf_counter()
        batch = self.prompts.groups(step, cfg.train.prompts_per_step, cfg.train.group_size)   # prompts + group ids
        shards = batch.shard(len(self.learners))                       # whole groups, shard r for learner r
        rollouts = self.take_rollouts(step, shards)                   # per-shard seeds, workers in parallel
        metrics = {"time/rollout": time.perf_counter() - started}
        scores = self.score(rollouts.images, batch.prompts) if self.scored else {}            # {name: Tensor[B]}
        metrics.update({f"reward/{name}": float(values.mean()) for name, values in scores.items()})
        advantages = self.advantages(scores, batch, metrics)          # on the whole batch, before sharding
        train_started = time.perf_counter()
        results = self.train(step, rollouts, shards, scores, advantages)   # every learner, its own shard
        metrics["time/train"] = time.perf_counter() - train_started
        self.sync_weights(step + 1)
        metrics["rollout/weights_lag"] = float(step - rollouts.weights_version)
        metrics.update(_mean_over_learners([r["metrics"] for r in results]))
        return metrics, any(r["skipped"] for r in results)

    def take_rollouts(self, step: int, shards: list[PromptBatch]) -> Rollouts:
        """This step's rollouts: prefetched while the previous update ran (max_staleness 1), or drawn now."""
        prefetched, self._prefetched = self._prefetched, None
        rollouts = prefetched if prefetched is not None and prefetched.step == step else self._draw(step, shards)
        for worker, ref in self._pending_syncs:  # surfaces a failed weight sync; the rollouts above already ran
            try:
                worker.fetch(ref)
            except Exception as err:  # noqa: BLE001 - a worker that died since is re-synced by its next rollout
                if not _is_actor_death(err):
                    raise
        self._pending_syncs = []
        return rollouts

    def _shards(self, step: int) -> list[PromptBatch]:
        train = self.cfg.train
        return self.prompts.groups(step, train.prompts_per_step, train.group_size).shard(len(self.learners))

    def _draw(self, step: int, shards: list[PromptBatch]) -> Rollouts:
        """Issue every shard's rollout at once (learner r draws shard r when colocated; rollout workers take the
        shards round-robin when disaggregated), then wait for all of them."""
        actors = self.learners if self.placement == "colocated" else [
            self.rollout_workers[index % len(self.rollout_workers)] for index in range(len(shards))]
        version = self.updates_done if self.placement == "colocated" else self.weights_version
        calls = [lambda a=actor, i=index, s=shard: a.call("rollout", step, s, i, self.scored, version, num_returns=2)
                 for index, (actor, shard) in enumerate(zip(actors, shards))]
        issued = [call() for call in calls]
        outputs = []
        for actor, call, refs in zip(actors, calls, issued):
            try:
                if self.backend == "ray":
                    actor.fetch(refs[1])
                outputs.append(refs)
            except Exception as err:  # noqa: BLE001 - a dead or emptied rollout worker is re-synced; re-run its shard
                if not _is_rerunnable(err) or actor in self.learners:
                    raise
                outputs.append(self._with_restarts(actor, "rollout", call, on_restart=self._resync(actor)))
        images = [actor.fetch(refs[1]) for actor, refs in zip(actors, outputs)] if self.scored else None
        return Rollouts(step, [refs[0] for refs in outputs], np.concatenate(images) if images else None, version)

    def _resync(self, worker: _Actor):
        def resync():
            worker.fetch(worker.call("set_generator_state", self.weights, self.weights_version))
        return resync

    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, torch.Tensor]:
        refs = {name: worker.call("score", images, prompts) for name, worker in self.reward_workers.items()}
        scores = {}
        for name, worker in self.reward_workers.items():
            try:
                values = worker.fetch(refs[name])
            except Exception as err:  # noqa: BLE001 - a dead worker is restarted by Ray; re-score the batch
                if not _is_actor_death(err):
                    raise
                values = self._with_restarts(worker, f"reward {name}", lambda w=worker: w.call("score", images, prompts))
            scores[name] = torch.from_numpy(np.array(values, dtype=np.float64))  # a copy: Ray arrays are read-only
        return scores

    def advantages(self, scores: dict[str, torch.Tensor], batch: PromptBatch,
                   metrics: dict[str, float]) -> Advantages | None:
        if self.spec.advantages is None or not scores:
            return None
        weights = {entry.name: entry.weight for entry in self.cfg.reward}
        advantages = group_advantages(scores, weights, torch.from_numpy(batch.group_ids), self.spec.advantages)
        metrics["advantage/zero_variance_groups"] = advantages.zero_variance_groups / advantages.groups
        metrics["advantage/abs_mean"] = float(advantages.values.abs().mean())
        return advantages

    def train(self, step: int, rollouts: Rollouts, shards: list[PromptBatch], scores: dict[str, torch.Tensor],
              advantages: Advantages | None) -> list[dict[str, Any]]:
        weights = {entry.name: entry.weight for entry in self.cfg.reward}
        rewards = sum(weights[name] * values for name, values in scores.items()) if scores else None
        offsets = np.cumsum([0] + [len(shard) for shard in shards])
        refs = []
        for rank, learner in enumerate(self.learners):
            part = slice(int(offsets[rank]), int(offsets[rank + 1]))
            refs.append(learner.call(
                "train", step, rollouts.trajectories[rank],
                {name: values[part].numpy() for name, values in scores.items()} or None,
                None if rewards is None else rewards[part].numpy(),
                None if advantages is None else advantages.values[part].numpy(),
                None if advantages is None else advantages.valid[part].numpy()))
        if self.cfg.runtime.max_staleness > 0 and step + 1 < self.cfg.train.steps:
            # Overlap: the next step's rollout runs on the current weights while the learners update.
            self._prefetched = self._draw(step + 1, self._shards(step + 1))
        results = [learner.fetch(ref) for learner, ref in zip(self.learners, refs)]
        self.updates_done = step + 1
        return results

    # ---- the loop ------------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> None:
        lead = self.learners[0]
        tensors, state = lead.fetch(lead.call("checkpoint_state"))
        if self.cfg.runtime.max_staleness > 0 and self.previous_weights is not None:
            # The next step's rollout is (or would be) drawn one update stale: keep the weights it is drawn with.
            tensors[STALE_ROLLOUT_WEIGHTS] = lead.fetch(self.previous_weights)
        self.run_dir.save_checkpoint(step, tensors, state, keep=self.cfg.train.keep_checkpoints)

    def log_samples(self, logger, step: int) -> None:
        lead = self.learners[0]
        images = lead.fetch(lead.call("sample_images", self.sample_prompts,
                                      step_seed(self.cfg.run.seed, 0, SAMPLES_STREAM)))
        logger.log_samples(step, images, self.sample_prompts)

    def run(self) -> int:
        from tqdm import tqdm

        cfg = self.cfg
        self.start()
        resumed = self.resume_from is not None
        logger = self.run_dir.metrics_logger(resumed_step=self.start_step if resumed else None, fresh=not resumed)
        skipped_in_a_row = 0
        interval: dict[str, list[float]] = {}
        step = self.start_step
        progress = tqdm(total=cfg.train.steps, initial=step, desc=f"rlfew train {cfg.algo.name}", unit="it",
                        dynamic_ncols=True, disable=None)
        try:
            with _sigint_as_keyboard_interrupt():
                if step == 0 and cfg.train.sample_every > 0:
                    self.log_samples(logger, 0)
                while step < cfg.train.steps:
                    metrics, skipped = self.iteration(step)
                    step += 1
                    if skipped:
                        skipped_in_a_row += 1
                        log.warning("step %d: a non-finite loss or gradient; the update was skipped (%d in a row)",
                                    step, skipped_in_a_row)
                        if skipped_in_a_row >= cfg.train.max_nonfinite_steps:
                            raise NonFiniteLossError(
                                f"aborting: {skipped_in_a_row} non-finite losses in a row (train.max_nonfinite_steps)"
                                f"; the last good checkpoint is kept in {self.run_dir.checkpoints_dir}")
                    else:
                        skipped_in_a_row = 0
                    for key, value in metrics.items():
                        interval.setdefault(key, []).append(value)
                    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                        # Means over the interval: under TTUR, generator metrics exist only on some steps.
                        logger.log(step, {key: float(np.mean(values)) for key, values in interval.items()})
                        interval = {}
                    progress.update(1)
                    progress.set_postfix({k.split("/", 1)[-1]: f"{v:.4g}" for k, v in metrics.items()
                                          if k.startswith(("loss/", "reward/"))})
                    if cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0:
                        self.log_samples(logger, step)
                    if skipped_in_a_row == 0 and (step % cfg.train.save_every == 0 or step == cfg.train.steps):
                        self.checkpoint(step)
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a checkpoint and exiting", step)
            if skipped_in_a_row == 0 and step > self.start_step:
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


def _mean_over_learners(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the learners that reported it (every rank trains its own shard)."""
    keys = dict.fromkeys(key for metrics in per_rank for key in metrics)
    return {key: float(np.mean([m[key] for m in per_rank if key in m])) for key in keys}


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

