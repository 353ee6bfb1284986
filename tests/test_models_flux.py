"""FLUX's own conventions through a tiny real FluxPipeline (packing, timesteps, dynamic shift, LoRA targets), and
equivalence with plain diffusers. The family-generic adapter and role tests run for FLUX in test_models.py."""

import pytest
import torch

from rlfew.export import export_lora
from rlfew.models import FluxAdapter, RoleSpec, add_noise, build_roles, load_pipeline, make_adapter
from rlfew.sampling import Deterministic, sample

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


@pytest.fixture(scope="module")
def roles(tiny_pipeline_dir):
    built = build_roles(tiny_pipeline_dir("flux"), {"teacher": RoleSpec(init="teacher"),
                                                    "generator": RoleSpec(init="student", lora_rank=4, trainable=True)})
    with torch.no_grad():
        for name, param in built["teacher"].net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return built


def _state(roles, batch=3, seed=0):
    adapter = roles.adapter
    gen = torch.Generator().manual_seed(seed)
    shape = adapter.latent_shape(adapter.default_resolution)
    x0 = torch.randn((batch, *shape), generator=gen)
    noise = torch.randn((batch, *shape), generator=gen)
    return x0, noise, torch.tensor([0.3, 0.6, 0.85][:batch])


def test_make_adapter_picks_flux_and_keeps_unpacked_latents(roles):
    adapter = roles.adapter
    assert isinstance(adapter, FluxAdapter) and adapter.family == "flux"
    assert adapter.latent_shape(64) == (16, 8, 8) and adapter.image_seq_len(64) == 16
    x = torch.randn(2, 16, 8, 8)
    packed = adapter.pack(x)
    assert packed.shape == (2, 16, 64)
    torch.testing.assert_close(adapter.unpack(packed, 8, 8), x, atol=0, rtol=0)
    cond = adapter.encode_prompts(PROMPTS[:2])
    assert cond.embeds.shape[:2] == (2, adapter.max_sequence_length) and cond.pooled.shape == (2, 32)
    assert not cond.extra, "FLUX text ids are not per-sample"


def test_network_inputs_follow_flux_pipeline_conventions(roles):
    """FluxPipeline's conventions: timestep = σ, packed tokens in and out, (tokens, 3) image ids, no guidance."""
    adapter = roles.adapter
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    target = adapter.native_target(x0, noise, sigma)
    seen = {}

    class Oracle(torch.nn.Module):
        dtype = torch.float32

        def forward(self, hidden_states, timestep, **kwargs):
            seen.update(hidden_states=hidden_states, timestep=timestep, **kwargs)
            return (adapter.pack(target),)

    pred = adapter.predict(Oracle(), x, sigma, adapter.encode_prompts(PROMPTS))
    torch.testing.assert_close(pred.x0, x0, atol=1e-4, rtol=1e-4)
    # FluxPipeline's conventions: timestep = σ (t/1000), packed tokens, (tokens, 3) image ids.
    torch.testing.assert_close(seen["timestep"], sigma)
    torch.testing.assert_close(seen["hidden_states"], adapter.pack(x))
    assert seen["img_ids"].shape == (16, 3) and seen["txt_ids"].shape == (adapter.max_sequence_length, 3)
    assert seen["guidance"] is None  # schnell-like: no guidance embedding


def test_lora_targets_reach_the_single_stream_blocks(roles):
    net = roles["teacher"].net
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in net.named_parameters() if "lora_A" in n}
    assert {"to_q", "to_k", "to_v"} <= targets
    assert any("single_transformer_blocks" in n for n, _ in net.named_parameters() if "lora_A" in n)


def test_sigma_grid_follows_dynamic_shifting(tiny_pipeline_dir):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    adapter = make_adapter(load_pipeline(tiny_pipeline_dir("flux")))
    grid = adapter.sigma_grid(4)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
    scheduler = adapter.pipeline.scheduler
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=adapter.unshifted_grid(4).tolist(), mu=mu)
    torch.testing.assert_close(grid.float(), scheduler.sigmas.float(), atol=1e-6, rtol=0)
    # An explicit shift overrides with the static formula; a larger image shifts more (μ grows with tokens).
    torch.testing.assert_close(adapter.sigma_grid(4, shift=1.0), torch.tensor([1, 0.75, 0.5, 0.25, 0],
                                                                               dtype=torch.float64))
    assert adapter.sigma_grid(4, resolution=1024)[2] > grid[2]


def test_rollouts_at_another_resolution_use_that_resolutions_grid(roles):
    """The trainer's rollout samples cfg.model.resolution on the dynamic-shift grid of that many image tokens."""
    import numpy as np

    from rlfew.config import TrainConfig
    from rlfew.method import RolloutSpec
    from rlfew.runtime.prompts import PromptBatch
    from rlfew.runtime.workers import draw_rollout

    adapter = roles.adapter
    cfg = TrainConfig()
    cfg.generator.steps = 2
    cfg.model.resolution = 2 * adapter.default_resolution
    shard = PromptBatch(["a red circle"], np.zeros(1, dtype=np.int64), 1)
    trajectory, _ = draw_rollout(roles["generator"], cfg, RolloutSpec(Deterministic()), 0, shard, 0, decode=False,
                                 weights_version=0)
    assert trajectory.states.shape[-1] == adapter.latent_shape(cfg.model.resolution)[-1]
    torch.testing.assert_close(trajectory.sigmas.double(), adapter.sigma_grid(2, resolution=cfg.model.resolution))
    assert trajectory.sigmas[1] > adapter.sigma_grid(2)[1]  # more tokens shift the grid up


def _flux_pipeline_latents(pipeline, adapter, noise, steps, guidance, prompts):
    kwargs = dict(prompt=prompts, num_inference_steps=steps, sigmas=FluxAdapter.unshifted_grid(steps).tolist(),
                  guidance_scale=adapter.embedded_guidance, output_type="latent", latents=adapter.pack(noise.clone()),
                  height=64, width=64, max_sequence_length=adapter.max_sequence_length)
    if guidance != 1.0:
        kwargs.update(true_cfg_scale=guidance, negative_prompt=[""] * len(prompts))
    with torch.no_grad():
        packed = pipeline(**kwargs).images
    return adapter.unpack(packed, *noise.shape[-2:])


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_deterministic_sampler_and_exported_lora_reproduce_flux_pipeline(guidance, tiny_pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    base = tiny_pipeline_dir("flux")
    prompts = PROMPTS[:2]
    roles = build_roles(base, {"teacher": RoleSpec(init="teacher"),
                               "generator": RoleSpec(init="student", lora_rank=4, lora_alpha=8, trainable=True)})
    teacher_role, generator = roles["teacher"], roles["generator"]
    with torch.no_grad():
        for name, param in generator.net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    adapter = roles.adapter
    noise = torch.randn(len(prompts), *adapter.latent_shape(64), generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        ours = sample(generator, cond, adapter.sigma_grid(4), Deterministic(), prompts=prompts, noise=noise,
                      guidance=guidance, decode=False).final_latents
        teacher = sample(teacher_role, cond, adapter.sigma_grid(4), Deterministic(), prompts=prompts, noise=noise,
                         guidance=guidance, decode=False).final_latents
    assert (ours - teacher).abs().max() > 1e-3, "the LoRA must matter for this test to mean anything"

    plain = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    torch.testing.assert_close(_flux_pipeline_latents(plain, adapter, noise, 4, guidance, prompts), teacher,
                               atol=1e-4, rtol=1e-4)
    plain.load_lora_weights(export_lora(roles, tmp_path / "lora"))
    torch.testing.assert_close(_flux_pipeline_latents(plain, adapter, noise, 4, guidance, prompts), ours,
                               atol=1e-4, rtol=1e-4)
