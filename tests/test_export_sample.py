"""Export round trip through plain diffusers, and the `rlfew sample` command."""

import json

import pytest
import torch

from rlfew.cli import main
from rlfew.export import export_lora, export_merged
from rlfew.models import RoleSpec, build_roles
from rlfew.models.flow import FlowAdapter
from rlfew.sampling import Deterministic, sample

PROMPTS = ["a red circle", "two blue squares"]


def _diffusers_latents(pipeline, adapter, noise, steps, guidance):
    kwargs = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  latents=noise.clone())
    if isinstance(adapter, FlowAdapter):
        kwargs["sigmas"] = FlowAdapter.unshifted_grid(steps).tolist()
    with torch.no_grad():
        return pipeline(**kwargs).images


@pytest.mark.parametrize("family", ["sd3", "sd"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_exported_lora_and_merged_reproduce_rlfew_samples(family, guidance, tiny_pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    base = tiny_pipeline_dir(family)
    roles = build_roles(base, {"teacher": RoleSpec(init="teacher"),
                               "generator": RoleSpec(init="student", lora_rank=4, lora_alpha=8, trainable=True)})
    generator = roles["generator"]
    with torch.no_grad():
        for name, param in generator.net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    adapter = roles.adapter
    noise = torch.randn(len(PROMPTS), *adapter.latent_shape(64), generator=torch.Generator().manual_seed(0))

    def rlfew_latents(role):
        with torch.no_grad():
            return sample(role, adapter.encode_prompts(PROMPTS), adapter.sigma_grid(4), Deterministic(),
                          prompts=PROMPTS, noise=noise, guidance=guidance, decode=False).final_latents

    ours, base_latents = rlfew_latents(generator), rlfew_latents(roles["teacher"])
    assert (ours - base_latents).abs().max() > 1e-3, "the LoRA must matter for this test to mean anything"

    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    with_lora = DiffusionPipeline.from_pretrained(base, local_files_only=True, **absent)
    with_lora.load_lora_weights(export_lora(roles, tmp_path / "lora"))
    torch.testing.assert_close(_diffusers_latents(with_lora, adapter, noise, 4, guidance), ours, atol=5e-4, rtol=1e-3)

    merged = DiffusionPipeline.from_pretrained(export_merged(roles, tmp_path / "merged"), local_files_only=True,
                                               **absent)
    torch.testing.assert_close(_diffusers_latents(merged, adapter, noise, 4, guidance), ours, atol=5e-4, rtol=1e-3)
    # Exporting must not disturb the live roles (the merge works on a copy).
    assert torch.equal(rlfew_latents(generator), ours) and torch.equal(rlfew_latents(roles["teacher"]), base_latents)


def test_sample_command_writes_a_grid(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", tiny_pipeline_dir("sd3"), "--sampler", "cps", "--steps", "4",
                 "--prompt", "a red circle", "--prompt", "a blue square", "--n", "2", "--out", str(out)])
    assert code == 0 and out.is_file()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 4 and report["seconds_per_image"] > 0
    from PIL import Image

    assert Image.open(out).size[0] == 2 * 128  # two columns of 64px images upscaled 2x


def test_sample_command_bad_input_exits_2(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", "m", "--sampler", "ddpm"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'ddpm'" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
