"""`rlfew bench ...`: speed and memory measurements as JSON (never asserted in tests)."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks that write JSON (sampling, runtime, dmd, grpo, "
                                                 "rewards)")
    bench = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)

    sampling = bench.add_parser("sampling", help="seconds per image of few-step sampling",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sampling.add_argument("--model", action="append",
                          help="diffusers folder / hub id (repeatable); default: tiny random sd3, sd, sdxl")
    sampling.add_argument("--steps", type=int, default=4)
    sampling.add_argument("--batch-size", type=int, default=8)
    sampling.add_argument("--repeats", type=int, default=3)
    sampling.add_argument("--device", default="auto")
    sampling.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sampling.add_argument("--out", default="bench_sampling.json")
    sampling.set_defaults(func=run_sampling_bench)

    runtime = bench.add_parser("runtime", help="DMD iteration time in-process vs Ray colocated vs Ray disaggregated "
                               "(rollouts strictly on-policy, and one update stale)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runtime.add_argument("--model", default="world:teacher", help="the teacher: diffusers folder or world:teacher")
    runtime.add_argument("--student", default="world:student", help="the generator's source (none: the teacher)")
    runtime.add_argument("--prompts", default="world:train", help="world:train or a prompt file")
    runtime.add_argument("--steps", type=int, default=20, help="timed iterations per mode (after 2 warm-up)")
    runtime.add_argument("--prompts-per-step", type=int, default=16)
    runtime.add_argument("--lora-rank", type=int, default=0, help="generator and critic LoRA rank (0: full, as "
                         "configs/world/dmd.yaml)")
    runtime.add_argument("--out", default="bench_runtime.json")
    runtime.set_defaults(func=run_runtime_bench)

    dmd = bench.add_parser("dmd", help="DMD iterations of a LoRA generator at a real model's size: step time, peak "
                           "memory, trainable dtypes, whether every LoRA tensor moved (a GPU check)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dmd.add_argument("--shape", choices=sorted(SHAPED_PIPELINES), default="tiny",
                     help="a random-init pipeline of this shape (sd35-medium: its 2.2B-parameter transformer and VAE; "
                          "tiny text encoders, which do not bear on the step)")
    dmd.add_argument("--resolution", type=int, help="image size (default: 512 for sd35-medium, 64 for tiny)")
    dmd.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                     help="frozen weights; trainable ones stay float32")
    dmd.add_argument("--lora-rank", type=int, default=32)
    dmd.add_argument("--lr", type=float, default=1e-6, help="small on purpose: the check that LoRA weights move")
    dmd.add_argument("--steps", type=int, default=5, help="timed iterations (after 1 warm-up), each a generator turn")
    dmd.add_argument("--prompts-per-step", type=int, default=2)
    dmd.add_argument("--device", default="auto")
    dmd.add_argument("--out", default="bench_dmd.json")
    dmd.set_defaults(func=run_dmd_bench)

    grpo = bench.add_parser("grpo", help="iterations of GRPO, or of any method trained on reward workers (TDM-R1: "
                            "--recipe configs/world/tdm_r1.yaml), rollout + scoring + update: images/s and "
                            "efficiency, the time of the iteration's model calls timed alone over the iteration's "
                            "time",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    grpo.add_argument("--recipe", default="configs/world/grpo.yaml", help="a recipe of a method trained on rewards")
    grpo.add_argument("--modes", default="inprocess,ray", help="comma-separated: inprocess, ray (colocated)")
    grpo.add_argument("--steps", type=int, default=5, help="timed iterations per mode (after 1 warm-up)")
    grpo.add_argument("--prompts-per-step", type=int, default=8)
    grpo.add_argument("--group-size", type=int, default=8)
    grpo.add_argument("--out", default="bench_grpo.json")
    grpo.add_argument("overrides", nargs="*", help="config overrides key=value, as for rlfew train")
    grpo.set_defaults(func=run_grpo_bench)

    rewards = bench.add_parser("rewards", help="reward scoring throughput",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rewards.add_argument("--reward", help="reward spec; default: tiny instances of every model reward + jpeg, world")
    rewards.add_argument("--batch-size", type=int, default=8)
    rewards.add_argument("--image-size", type=int, default=64)
    rewards.add_argument("--backward", action="store_true", help="also time the gradient to the images")
    rewards.add_argument("--out", default="bench_rewards.json")
    rewards.set_defaults(func=run_rewards_bench)


def _environment(device: str | None = None) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}
    if device and device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _write(out: str, report: dict) -> int:
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def run_sampling_bench(args) -> int:
    from rlfew.commands.common import load_generator_role
    from rlfew.models import resolve_device
    from rlfew.sampling import Deterministic, sample
    from rlfew.testing import save_tiny_pipeline

    device = resolve_device(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        models = args.model or [str(save_tiny_pipeline(f, Path(scratch) / f)) for f in ("sd3", "sd", "sdxl")]
        for model in models:
            role = load_generator_role(model, device=device, dtype=args.dtype)
            adapter = role.adapter
            prompts = ["a red circle"] * args.batch_size
            cond = adapter.encode_prompts(prompts)
            times = []
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                with torch.no_grad():
                    sample(role, cond, adapter.sigma_grid(args.steps), Deterministic(), prompts=prompts,
                           generator=torch.Generator(adapter.device).manual_seed(0))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            best = min(times[1:])  # the first call warms up kernels and allocators
            entry = {"seconds_per_batch": best, "seconds_per_image": best / args.batch_size,
                     "family": adapter.family, "resolution": adapter.default_resolution}
            if device.startswith("cuda"):
                entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results[Path(model).name if Path(model).exists() else model] = entry
    return _write(args.out, {"bench": "sampling", "steps": args.steps, "batch_size": args.batch_size,
                             "dtype": args.dtype, "device": device, "results": results,
                             "environment": _environment(device)})


RUNTIME_MODES = {  # placement and staleness of each measured mode
    "inprocess": ["runtime.backend=inprocess"],
    "ray_colocated": ["runtime.backend=ray", "runtime.placement=colocated"],
    "ray_disaggregated_staleness0": ["runtime.backend=ray", "runtime.placement=disaggregated", "runtime.max_staleness=0"],
    "ray_disaggregated_staleness1": ["runtime.backend=ray", "runtime.placement=disaggregated", "runtime.max_staleness=1"],
}


def run_runtime_bench(args) -> int:
    """World DMD2 (by default a full generator and critic, as configs/world/dmd.yaml) timed per iteration in every
    mode: the
    median of `--steps` iterations after two warm-up ones, and its ratio to the in-process run. Each Ray mode starts
    and stops its own local Ray, as a user's run does; startup counts until the first iteration is done (actors
    are built asynchronously)."""
    from rlfew.config import load_config
    from rlfew.runtime.driver import Trainer

    results = {}
    student = [] if args.student in (None, "none") else [f"generator.source={args.student}"]
    with tempfile.TemporaryDirectory() as scratch:
        for mode, overrides in RUNTIME_MODES.items():
            cfg = load_config(None, [f"model.source={args.model}", *student, f"train.prompts={args.prompts}",
                                     f"train.prompts_per_step={args.prompts_per_step}", f"train.steps={args.steps + 2}",
                                     f"roles.generator.lora_rank={args.lora_rank}",
                                     f"roles.critic.lora_rank={args.lora_rank}", "teacher.guidance=4.0",
                                     "train.sample_every=0", f"train.save_every={10**9}", "train.log_every=1",
                                     f"run.output_dir={scratch}/runs", f"run.name={mode}", *overrides])
            trainer = Trainer(cfg)
            started = time.perf_counter()
            trainer.start()
            trainer.iteration(0)
            startup = time.perf_counter() - started
            step_times = []
            for step in range(1, args.steps + 2):
                started = time.perf_counter()
                trainer.iteration(step)
                step_times.append(time.perf_counter() - started)
            trainer.shutdown()
            if cfg.runtime.backend == "ray":
                import ray

                ray.shutdown()
            timed = sorted(step_times[1:])
            results[mode] = {"startup_and_first_step_seconds": startup, "median_step_seconds": timed[len(timed) // 2],
                             "mean_step_seconds": sum(timed) / len(timed)}
    base = results["inprocess"]["median_step_seconds"]
    for mode in results:
        results[mode]["step_time_ratio_vs_inprocess"] = results[mode]["median_step_seconds"] / base
    return _write(args.out, {"bench": "runtime", "method": "dmd", "model": args.model, "student": args.student,
                             "prompts_per_step": args.prompts_per_step, "lora_rank": args.lora_rank,
                             "timed_steps": args.steps,
                             "results": results, "environment": _environment()})


SHAPED_PIPELINES = {"tiny": 64, "sd35-medium": 512}  # shape -> default resolution


def run_dmd_bench(args) -> int:
    """`--steps` DMD iterations (TTUR 1: a generator and a critic update each) of LoRA roles on a random-init
    pipeline of `--shape`, rolled out and trained as a learner does."""
    from rlfew.config import load_config
    from rlfew.method import build_method
    from rlfew.models import resolve_device
    from rlfew.models.roles import frozen_and_trainable_dtypes
    from rlfew.testing import rollout_batch, save_shaped_pipeline

    device = resolve_device(args.device)
    resolution = args.resolution or SHAPED_PIPELINES[args.shape]
    prompts = ["a red circle left of a blue square", "two green triangles"] * args.prompts_per_step
    with tempfile.TemporaryDirectory() as scratch:
        source = save_shaped_pipeline(args.shape, Path(scratch) / args.shape)
        cfg = load_config(None, [f"model.source={source}", f"model.dtype={args.dtype}", f"model.device={device}",
                                 f"model.resolution={resolution}", f"roles.generator.lora_rank={args.lora_rank}",
                                 f"roles.critic.lora_rank={args.lora_rank}", f"train.lr={args.lr}",
                                 "algo.options={ttur: 1}", "generator.steps=4"])
        method = build_method(cfg)
        generator = method.roles["generator"]
        initial = {name: value.clone() for name, value in generator.trainable_state_dict().items()}
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step_times = []
        for step in range(args.steps + 1):
            started = time.perf_counter()
            method.train_step(rollout_batch(method, step, prompts[:args.prompts_per_step]))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - started)
        moved = sum(not torch.equal(value, initial[name]) for name, value in generator.trainable_state_dict().items())
        dtypes = frozen_and_trainable_dtypes(method.roles)
        timed = sorted(step_times[1:])
        report = {"bench": "dmd", "shape": args.shape, "resolution": resolution, "dtype": args.dtype,
                  "device": device, "lora_rank": args.lora_rank, "lr": args.lr, "prompts_per_step": args.prompts_per_step,
                  "timed_steps": args.steps, "median_step_seconds": timed[len(timed) // 2],
                  "generator_lora_tensors": len(initial), "generator_lora_tensors_moved": moved,
                  "trainable_dtypes": sorted(map(str, dtypes["trainable"])),
                  "frozen_dtypes": sorted(map(str, dtypes["frozen"])),
                  "denoiser_parameters": sum(p.numel() for p in method.roles["teacher"].net.parameters())}
        if device.startswith("cuda"):
            report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return _write(args.out, {**report, "environment": _environment(device)})


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_grpo_bench(args) -> int:
    """A GRPO recipe's iteration timed whole in each runtime mode (median of `--steps` after one warm-up), and the
    model calls it needs timed alone in this process on the same batch sizes: the rollout with its decode, the reward,
    and the method's update (forward/backward passes and optimiser steps). efficiency = (rollout + reward + update
    alone) / iteration: 1 means the runtime adds nothing around the model calls."""
    from rlfew.algos.advantages import group_advantages
    from rlfew.config import load_config
    from rlfew.method import build_method
    from rlfew.rewards import load as load_reward
    from rlfew.runtime.driver import Trainer
    from rlfew.runtime.prompts import PromptSource
    from rlfew.runtime.workers import attach_scores, draw_rollout, learner_batch

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - {"inprocess", "ray"})
    if unknown:
        from rlfew.errors import UsageError

        raise UsageError(f"--modes: {unknown[0]!r} is not a mode; choose from inprocess, ray")
    sizes = [f"train.prompts_per_step={args.prompts_per_step}", f"train.group_size={args.group_size}",
             f"train.steps={args.steps + 1}", "train.sample_every=0", f"train.save_every={10**9}",
             "train.log_every=1", "runtime.placement=colocated", *args.overrides]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            cfg = load_config(args.recipe, [*sizes, f"runtime.backend={mode}", f"run.output_dir={scratch}/runs",
                                            f"run.name={mode}"])
            trainer = Trainer(cfg)
            trainer.start()
            step_times = []
            for step in range(args.steps + 1):
                started = time.perf_counter()
                trainer.iteration(step)
                step_times.append(time.perf_counter() - started)
            trainer.shutdown()
            if mode == "ray":
                import ray

                ray.shutdown()
            results[mode] = {"median_iteration_seconds": _median(step_times[1:])}

        cfg = load_config(args.recipe, [*sizes, "runtime.backend=inprocess", f"run.output_dir={scratch}/runs",
                                        "run.name=alone"])
        method = build_method(cfg)
        reward = load_reward(cfg.reward)
        weights = {entry.name: entry.weight for entry in cfg.reward}
        spec, generator, source = type(method).spec(cfg, method.options), method.roles["generator"], PromptSource(
            cfg.train.prompts, cfg.run.seed)
        alone: dict[str, list[float]] = {"rollout": [], "reward": [], "update": []}
        for step in range(args.steps + 1):
            shard = source.groups(step, cfg.train.prompts_per_step, cfg.train.group_size)
            started = time.perf_counter()
            trajectory, images = draw_rollout(generator, cfg, spec.rollout(step), step, shard, 0, True, step)
            rolled = time.perf_counter()
            tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
            with torch.no_grad():
                scores = reward.score_each(tensor, shard.prompts) if hasattr(reward, "score_each") else {
                    reward.name: reward.score(tensor, shard.prompts)}
            scored = time.perf_counter()
            scores = {name: value.double() for name, value in scores.items()}
            advantages = group_advantages(scores, weights, torch.from_numpy(shard.group_ids), spec.advantages)
            attach_scores(trajectory, {n: v.numpy() for n, v in scores.items()},
                          sum(weights[n] * v for n, v in scores.items()).numpy(), advantages.values.numpy(),
                          advantages.valid.numpy())
            batch = learner_batch(cfg, generator, step, trajectory, 0)
            updating = time.perf_counter()
            method.train_step(batch)
            finished = time.perf_counter()
            if step:  # the first is the warm-up
                for key, seconds in (("rollout", rolled - started), ("reward", scored - rolled),
                                     ("update", finished - updating)):
                    alone[key].append(seconds)
    model_calls = {key: _median(values) for key, values in alone.items()}
    images = args.prompts_per_step * args.group_size
    for mode, result in results.items():
        result["images_per_second"] = images / result["median_iteration_seconds"]
        result["efficiency"] = sum(model_calls.values()) / result["median_iteration_seconds"]
    return _write(args.out, {"bench": "grpo", "recipe": args.recipe, "overrides": args.overrides,
                             "images_per_iteration": images, "timed_steps": args.steps,
                             "model_calls_alone_seconds": model_calls, "results": results,
                             "environment": _environment()})


def run_rewards_bench(args) -> int:
    from rlfew.rewards import benchmark_rewards
    from rlfew.rewards.tiny import build_tiny_rewards

    with tempfile.TemporaryDirectory() as scratch:
        specs = args.reward or [*build_tiny_rewards(scratch).values(), "jpeg", "world"]
        report = benchmark_rewards(specs, batch_size=args.batch_size, image_size=args.image_size,
                                   backward=args.backward)
    report["environment"] = _environment()
    return _write(args.out, report)
