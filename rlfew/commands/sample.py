"""`rlfew sample`: few-step sampling from any diffusers folder or hub id into a captioned PNG grid."""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlfew.commands.common import load_generator_role
from rlfew.runtime.prompts import read_prompts
from rlfew.images import save_grid
from rlfew.sampling import SAMPLERS, make_sampler


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="few-step sampling into a captioned PNG grid",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers folder, hub id, or world:teacher / world:student")
    parser.add_argument("--lora", help="folder with LoRA weights saved by `rlfew export --mode lora`")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="world:train, world:eval or a text file with one prompt a line")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--max-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sampler", default="deterministic", choices=list(SAMPLERS))
    parser.add_argument("--eta", type=float, help="cps / dance_grpo stochasticity")
    parser.add_argument("--noise-level", type=float, help="flow_grpo noise level a")
    parser.add_argument("--shift", type=float, help="flow models: σ-grid shift (default: the scheduler's)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--resolution", type=int, help="image size (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="samples.png")
    parser.set_defaults(func=run_sample)


def run_sample(args) -> int:
    from rlfew.sampling import sample

    sampler = make_sampler(args.sampler, eta=args.eta, noise_level=args.noise_level)
    prompts = read_prompts(args.prompts, args.prompt)[: args.max_prompts]
    generator_role = load_generator_role(args.model, args.lora, args.device, args.dtype)
    adapter = generator_role.adapter
    all_prompts = [p for p in prompts for _ in range(args.n)]
    rng = torch.Generator(adapter.device).manual_seed(args.seed)
    resolution = args.resolution or adapter.default_resolution
    start = time.perf_counter()
    with torch.no_grad():
        cond = adapter.encode_prompts(all_prompts)
        trajectory = sample(generator_role, cond, adapter.sigma_grid(args.steps, args.shift, resolution), sampler,
                            prompts=all_prompts, generator=rng, latent_shape=adapter.latent_shape(resolution),
                            guidance=args.guidance)
    seconds = time.perf_counter() - start
    path = save_grid(args.out, trajectory.images, all_prompts, columns=args.n)
    print(json.dumps({"out": str(path), "images": len(all_prompts), "steps": args.steps, "sampler": args.sampler,
                      "seconds": round(seconds, 3), "seconds_per_image": round(seconds / len(all_prompts), 4)}))
    return 0
