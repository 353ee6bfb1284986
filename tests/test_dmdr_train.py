"""DMDR end to end through `rlfew train`: the headline command `--algo dmdr --reward pickscore` (and a two-reward
spec) on a tiny SD-Turbo-shaped pipeline through Ray, with PickScore resolved from its real hub ids in a fake,
offline Hugging Face cache; and every recipe in configs/ on a tiny pipeline of its family, in-process."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlfew.cli import main
from rlfew.config import load_config
from rlfew.method import resolve_method
from rlfew.rewards.clip_rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rlfew.rewards.tiny import build_tiny_clip

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a blue square"]
# What rewards/clip_rewards.py's PickScore loads by default: the model, and the processor (tokenizer + image
# normalisation in preprocessor_config.json).
PICKSCORE_REPOS = ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def fake_hub_cache(root: Path, clip_folder: Path) -> Path:
    """A huggingface_hub cache (models--OWNER--NAME/snapshots/<commit>/..., refs/main) holding the tiny CLIP under
    PickScore's real repository ids, so `--reward pickscore` resolves offline exactly as it would online."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo in PICKSCORE_REPOS:
        repo_dir = root / f"models--{repo.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / commit
        shutil.copytree(clip_folder, snapshot)
        (snapshot / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "crop_size": 64}))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
    return root


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_dmdr_ran(run_dir: Path, steps: int) -> list[dict]:
    """Every step logged with finite values; iteration 0 (a generator turn, no cold start) used the reward."""
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float)), records
    first = records[0]
    assert first["updated/generator"] == 1.0 and first["schedule/reward_active"] == 1.0
    assert first["loss/generator"] == pytest.approx(first["loss/dmd"] + 0.05 * first["loss/reward"], rel=1e-5)
    assert all(r["loss/critic"] > 0 for r in records)
    return records


# ------------------------------------------------------------------------------------ the headline command

@pytest.mark.ray
@pytest.mark.parametrize("reward", ["pickscore", "pickscore:1.0,world-clip:0.5"])
def test_rlfew_train_dmdr_with_pickscore_through_ray(tiny_pipeline_dir, tiny_clip, prompts_file, tmp_path, reward):
    """`rlfew train --algo dmdr --reward ... --model <tiny SD-Turbo-shaped pipeline>` on Ray (the default backend),
    in a subprocess so the fake hub cache and offline mode reach every Ray worker."""
    cache = fake_hub_cache(tmp_path / "hub", tiny_clip)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "rlfew.cli", "train", "--algo", "dmdr", "--reward", reward,
               "--model", tiny_pipeline_dir("sd"), "train.steps=2", "train.prompts_per_step=2", "train.log_every=1",
               "train.save_every=2", "train.sample_every=2", f"train.prompts={prompts_file}",
               f"eval.prompts={prompts_file}", "runtime.num_cpus=2", f"run.output_dir={tmp_path / 'runs'}",
               "run.name=dmdr"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "runs" / "dmdr"
    records = assert_dmdr_ran(run_dir, steps=2)
    assert load_config(run_dir / "config.yaml").runtime.backend == "ray"
    # The learner logs each reward under its own name on its generator turns (no second copy in a worker).
    names = [part.split(":")[0] for part in reward.split(",")]
    assert all(any(f"reward/{name}" in r for r in records) for name in names)
    assert (run_dir / "checkpoints" / "step_2").is_dir() and (run_dir / "samples" / "step_2.png").is_file()


# ----------------------------------------------------------------------------------------------- recipes

RECIPES = [("sd-turbo", "sd"), ("sdxl-turbo", "sdxl"), ("sd35", "sd3")]


@pytest.mark.parametrize("recipe,family", RECIPES)
def test_recipe_trains_two_iterations_on_a_tiny_pipeline_of_its_family(recipe, family, tiny_pipeline_dir, tiny_clip,
                                                                       prompts_file, tmp_path):
    """The recipe as written, with only the model, the reward checkpoint, the sizes and the cold start swapped, so
    the reward term runs in iteration 0."""
    tiny_pickscore = f"{{model: '{tiny_clip}', processor: '{tiny_clip}'}}"
    code = main(["train", str(REPO / "configs" / recipe / "dmdr.yaml"), f"model.source={tiny_pipeline_dir(family)}",
                 "generator.source=null", "model.resolution=null",
                 f"reward=[{{name: pickscore, options: {tiny_pickscore}}}]", "algo.options.cold_start_steps=0",
                 "algo.options.reward_weight=0.05", "train.steps=2", "train.prompts_per_step=2", "train.log_every=1",
                 "train.sample_every=0", "train.save_every=2", f"train.prompts={prompts_file}",
                 f"eval.prompts={prompts_file}", "runtime.backend=inprocess", f"run.output_dir={tmp_path}",
                 "run.name=recipe"])
    assert code == 0
    assert_dmdr_ran(tmp_path / "recipe", steps=2)


def test_world_recipe_loads_and_validates():
    """configs/world/dmdr.yaml needs the world:student asset to run; its config must already be valid."""
    cfg = load_config(REPO / "configs" / "world" / "dmdr.yaml")
    resolved = resolve_method(cfg)
    assert (cfg.algo.name, cfg.model.source, cfg.generator.source) == ("dmdr", "world:teacher", "world:student")
    assert [entry.name for entry in cfg.reward] == ["world-clip"] and resolved.options.dynadg and resolved.options.dynars
    assert resolved.roles["critic"].lora_rank > 0  # DynaDG's critic is a LoRA on the teacher
