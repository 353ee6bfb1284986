"""`rlfew rewards list` and `rlfew rewards score`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rlfew.errors import UsageError
from rlfew.images import from_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("rewards", help="list rewards, score a folder of images")
    commands = parser.add_subparsers(dest="rewards_command", metavar="SUBCOMMAND", required=True)

    listing = commands.add_parser("list", help="built-in rewards and installed entry points")
    listing.set_defaults(func=run_list)

    score = commands.add_parser("score", help="score a folder of images against prompts")
    score.add_argument("--reward", required=True, help="reward spec, e.g. pickscore or 'pickscore:1.0,hpsv2:0.5'")
    score.add_argument("--images", required=True, type=Path, help="folder of images, read in sorted name order")
    score.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line, one per image")
    score.add_argument("--out", type=Path, help="write per-image scores as JSON here")
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(func=run_score)


def run_list(args) -> int:
    from rlfew.rewards.api import list_rewards

    differentiable = {True: "yes", False: "no", None: "?"}
    rows = [(info.name, differentiable[info.differentiable], info.source, info.summary) for info in list_rewards()]
    widths = [max(len(row[i]) for row in rows + [("name", "differentiable", "source", "")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'differentiable':<{widths[1]}}  {'source':<{widths[2]}}  description")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    return 0


def read_image_folder(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"--images {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--images {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"--prompts {str(path)!r} is not a file")
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_folder(reward, files: list[Path], prompts: list[str], batch_size: int = 8) -> dict[str, list[float]]:
    """Scores by reward name (plus "total" for a multi-reward). Consecutive images of the same size are
    batched; a size change starts a new batch."""
    from rlfew.rewards.multi import MultiReward

    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in files]
    scores: dict[str, list[float]] = {}
    start = 0
    while start < len(arrays):
        end = start + 1
        while end < len(arrays) and end - start < batch_size and arrays[end].shape == arrays[start].shape:
            end += 1
        images, batch_prompts = from_uint8(np.stack(arrays[start:end])), prompts[start:end]
        with torch.no_grad():
            if isinstance(reward, MultiReward):
                each = reward.score_each(images, batch_prompts)
                each["total"] = reward.weighted_sum(each)
            else:
                each = {reward.name: reward.score(images, batch_prompts)}
        for name, values in each.items():
            scores.setdefault(name, []).extend(values.tolist())
        start = end
    return scores


def run_score(args) -> int:
    from rlfew.rewards.api import load

    files, prompts = read_image_folder(args.images), read_prompts(args.prompts)
    if len(files) != len(prompts):
        raise UsageError(f"{len(files)} images in {str(args.images)!r} but {len(prompts)} prompts in "
                         f"{str(args.prompts)!r}; give one prompt per image, in sorted file-name order")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    reward = load(args.reward)
    scores = score_folder(reward, files, prompts, args.batch_size)
    summary_name = "total" if "total" in scores else reward.name
    rows = [{"image": path.name, "prompt": prompt, **{name: values[i] for name, values in scores.items()}}
            for i, (path, prompt) in enumerate(zip(files, prompts))]
    result = {"reward": args.reward, "count": len(rows),
              "mean": {name: float(np.mean(values)) for name, values in scores.items()}, "scores": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    for row in rows:
        print(f"{row[summary_name]:10.4f}  {row['image']}  {row['prompt']}")
    print(f"mean {summary_name}: {result['mean'][summary_name]:.4f} over {len(rows)} images")
    return 0
