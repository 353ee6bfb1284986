"""The world generator: training commands from scratch, reload through plain diffusers, resume, the shipped teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from safetensors import safe_open

from rlfew.cli import main as rlfew_main
from rlfew.world import pipeline as world_pipeline
from rlfew.world.pipeline import (
    DenoiserArchitecture, DenoiserTrainConfig, VaeArchitecture, VaeTrainConfig, assemble_pipeline, build_scheduler,
    build_text_encoder, build_transformer, build_vae, collapsed_zero_text_tokens, load_pipeline, measure_teacher,
)
from rlfew.world.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_VAE_FLAGS = ["--block-out-channels", "8,8,8", "--norm-num-groups", "4"]
TINY_DENOISER_FLAGS = ["--text-hidden-size", "16", "--text-projection-dim", "8", "--text-heads", "2",
                       "--transformer-layers", "1", "--attention-heads", "2", "--attention-head-dim", "8"]
TINY_DENOISER = DenoiserArchitecture(text_hidden_size=16, text_projection_dim=8, text_heads=2, transformer_layers=1,
                                     attention_heads=2, attention_head_dim=8)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plain_load(path: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, local_files_only=True)


def _sample(pipe: StableDiffusion3Pipeline, prompts: list[str], steps: int = 2) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=64, width=64,
                generator=generator, output_type="pt").images


@pytest.fixture(scope="module")
def tiny_vae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    code = rlfew_main(["world", "train-vae", "--steps", "3", "--batch-size", "2", "--seed", "1", "--stats-batches", "1",
                       "--eval-images", "4", "--out", str(out), *TINY_VAE_FLAGS])
    assert code == 0
    return out


def test_train_vae_writes_a_diffusers_vae_with_latent_statistics(tiny_vae_run):
    vae = AutoencoderKL.from_pretrained(tiny_vae_run / "vae")
    assert vae.config.block_out_channels == [8, 8, 8]  # f=4: 64x64 -> 16x16
    assert vae.config.scaling_factor != 0.18215 and vae.config.shift_factor is not None  # measured, not defaults
    assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 16, 16)
    report = json.loads((tiny_vae_run / "reconstruction.json").read_text())
    # the saved report is the evaluator's verdict on this very VAE's reconstructions (train-vae's seed 1, + 1)
    assert report == json.loads(json.dumps(world_pipeline.reconstruction_report(vae, seed=2, count=4)))


def test_train_denoiser_from_scratch_reloads_with_plain_diffusers(tiny_vae_run, tmp_path):
    out = tmp_path / "denoiser"
    code = rlfew_main(["world", "train-denoiser", "--vae", str(tiny_vae_run), "--steps", "3", "--batch-size", "2",
                       "--seed", "1", "--checkpoint-every", "2", "--out", str(out), *TINY_DENOISER_FLAGS])
    assert code == 0
    pipe = _plain_load(out)
    assert pipe.tokenizer_max_length == 16
    images = _sample(pipe, ["a red circle", "two squares"])
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    checkpoint_pipeline = _plain_load(out / "checkpoints" / "step_2" / "pipeline")  # periodic full diffusers folder
    assert _sample(checkpoint_pipeline, ["a circle"], steps=1).shape == (1, 3, 64, 64)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["loss"] > 0

    teacher = tmp_path / "teacher"
    assert rlfew_main(["world", "build-teacher", "--run", str(out), "--out", str(teacher), "--shift", "1.5"]) == 0
    with safe_open(teacher / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(key).dtype == torch.float16 for key in weights.keys())  # stored small
    rebuilt = _plain_load(teacher)
    assert rebuilt.transformer.dtype == torch.float32  # plain diffusers loads float32 unless asked otherwise
    assert rebuilt.scheduler.config.shift == 1.5


def _train(tiny_vae_run: Path, out: Path, steps: int, resume: str | None = None) -> StableDiffusion3Pipeline:
    config = DenoiserTrainConfig(steps=steps, batch_size=2, seed=3, checkpoint_every=1, architecture=TINY_DENOISER)
    return world_pipeline.train_denoiser(config, tiny_vae_run, out, resume=resume)


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tiny_vae_run, tmp_path):
    uninterrupted = _train(tiny_vae_run, tmp_path / "whole", steps=3)
    _train(tiny_vae_run, tmp_path / "split", steps=2)  # "killed" after step 2; its checkpoint is step_1
    resumed = _train(tiny_vae_run, tmp_path / "split", steps=3, resume="latest")
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]  # the interrupted run's final record (step 2, after its checkpoint) is dropped
    assert (tmp_path / "split" / "checkpoints" / "step_2").is_dir()  # written by the resumed run
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(uninterrupted, name).state_dict(), getattr(resumed, name).state_dict()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=f"{name}.{key}")


def test_collapsed_zero_tokens_compute_what_the_plain_pipeline_computes():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(max_length=16)
    pipe = assemble_pipeline(build_vae(VaeArchitecture(block_out_channels=(8, 8, 8), norm_num_groups=4)), tokenizer,
                             build_text_encoder(tokenizer, TINY_DENOISER), build_text_encoder(tokenizer, TINY_DENOISER),
                             build_transformer(TINY_DENOISER, latent_channels=4), build_scheduler(2.0))
    for parameter in pipe.transformer.parameters():  # large weights so the zero tokens matter
        parameter.data.normal_(0, 0.3)
    prompts = ["a red circle left of a blue square", "three triangles"]
    x, timestep = torch.randn(2, 4, 16, 16), torch.tensor([250.0, 900.0])

    def velocity(max_sequence_length: int) -> torch.Tensor:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return pipe.transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep).sample

    with torch.no_grad():
        plain = velocity(world_pipeline.SD3_ZERO_TEXT_TOKENS)
        with collapsed_zero_text_tokens(pipe.transformer):
            collapsed = velocity(1)
        naive = velocity(1)
    torch.testing.assert_close(collapsed, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    assert (naive - plain).abs().max() > 1e-2  # dropping the zero tokens without the correction is not the same model
    assert world_pipeline.SD3_ZERO_TEXT_TOKENS == 256


def test_measure_teacher_reports_accuracy_per_step_count(tiny_vae_run, tmp_path):
    out = tmp_path / "denoiser"
    _train(tiny_vae_run, out, steps=1)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\ntwo squares\n")
    report = measure_teacher(load_pipeline(out), prompts=str(prompt_file), steps=(2, 1), images_per_prompt=2)
    assert set(report["results"]) == {"2", "1"}
    # each entry is the evaluator on that many steps' samples: 1 step of this pipeline, sampled again, agrees
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    one_step = report["results"]["1"]
    assert one_step["count"] == 4 and one_step["accuracy"] == pytest.approx(
        measure_teacher(pipe, prompts=str(prompt_file), steps=(1,), images_per_prompt=2)["results"]["1"]["accuracy"])


def test_recipe_file_matches_the_command_defaults():
    recipe = yaml.safe_load((REPO / "configs" / "world" / "teacher.yaml").read_text())
    for section, config in (("vae", VaeTrainConfig()), ("denoiser", DenoiserTrainConfig())):
        expected = {k: v for k, v in vars(config).items() if k != "architecture"}
        expected.update(vars(config.architecture))
        recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe[section]["hyperparameters"].items()}
        assert recorded == expected, section


def test_recipe_continuation_command_gives_its_recorded_overrides():
    import dataclasses

    from rlfew.cli import build_parser
    from rlfew.world.pipeline import _overrides

    continuation = yaml.safe_load((REPO / "configs" / "world" / "teacher.yaml").read_text())["denoiser_continuation"]
    args = build_parser("world").parse_args(continuation["command"].split()[1:])
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in continuation["overrides"].items()}
    assert _overrides(DenoiserTrainConfig(), args) == dataclasses.replace(DenoiserTrainConfig(), **overrides)
    assert args.resume.endswith("step_5000")


def test_shipped_teacher_loads_with_plain_diffusers_and_samples():
    from rlfew.world import resolve_world_asset

    pipe = _plain_load(resolve_world_asset("world:teacher"))
    assert sum(f.stat().st_size for f in resolve_world_asset("world:teacher").rglob("*") if f.is_file()) < 12e6
    images = _sample(pipe.to(torch.float32), ["a red circle", "a yellow circle left of a blue square"])
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
