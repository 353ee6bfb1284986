"""Family adapters and roles, through tiny real diffusers pipelines saved and reloaded from disk, for every family
(FLUX's own conventions and its equivalence with FluxPipeline are in test_models_flux.py)."""

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from rlfew.errors import ModelLoadError, UsageError
from rlfew.models import Prediction, RoleSpec, add_noise, build_roles, load_pipeline, make_adapter
from rlfew.models.vp import VPAdapter

FAMILIES = ["sd3", "sd", "sd-v", "sdxl", "flux"]
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
# Generator and critic LoRAs on one network; the reference is that network with every adapter off.
SHARED_TABLE = {"teacher": RoleSpec(init="teacher"),
                "generator": RoleSpec(init="student", lora_rank=4, trainable=True),
                "critic": RoleSpec(init="teacher", lora_rank=4, trainable=True),
                "reference": RoleSpec(init="student")}


class _Roles:
    """Attribute access to the roles for the tests below (roles.teacher, roles.generator, ...)."""

    def __init__(self, roles):
        self.adapter = roles.adapter
        for name in roles:
            setattr(self, name, roles[name])


@pytest.fixture(scope="module", params=FAMILIES)
def roles(request, tiny_pipeline_dir):
    built = build_roles(tiny_pipeline_dir(request.param), SHARED_TABLE)
    # Give the LoRAs non-zero B matrices so "LoRA on" and "LoRA off" really differ.
    with torch.no_grad():
        for name, param in built["teacher"].net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return _Roles(built)


def _state(roles, batch=3, seed=0):
    adapter = roles.adapter
    gen = torch.Generator().manual_seed(seed)
    shape = adapter.latent_shape(adapter.default_resolution)
    x0 = torch.randn((batch, *shape), generator=gen)
    noise = torch.randn((batch, *shape), generator=gen)
    sigma = torch.tensor([0.3, 0.6, 0.85][:batch]) * adapter.sigma_max
    return x0, noise, sigma


def test_prediction_parameterisations_are_consistent(roles):
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    cond = roles.adapter.encode_prompts(PROMPTS)
    pred = roles.teacher.predict(x, sigma, cond)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close((1 - s) * pred.x0 + s * pred.eps, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.velocity, pred.eps - pred.x0)
    flow = Prediction.from_velocity(x, sigma, pred.velocity)
    torch.testing.assert_close(flow.x0, pred.x0, atol=1e-4, rtol=1e-4)


def test_oracle_network_output_recovers_x0_and_noise(roles, monkeypatch):
    """A network that outputs the true native target must give back exactly the x0 and ε that made x."""
    adapter = roles.adapter
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    target = adapter.native_target(x0, noise, sigma)

    class Oracle(torch.nn.Module):
        dtype = torch.float32

        def forward(self, *args, **kwargs):
            return (adapter.pack(target) if adapter.family == "flux" else target,)  # FLUX outputs packed tokens

    pred = adapter.predict(Oracle(), x, sigma, adapter.encode_prompts(PROMPTS))
    torch.testing.assert_close(pred.x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.eps, noise, atol=1e-4, rtol=1e-4)
    assert float(adapter.denoising_loss(pred, x0, noise, sigma).max()) < 1e-8


def test_vp_rescaling_matches_the_vp_forward_process(tiny_pipeline_dir):
    adapter = make_adapter(load_pipeline(tiny_pipeline_dir("sd")))
    alphas_cumprod = adapter.pipeline.scheduler.alphas_cumprod.double()
    t = torch.tensor([0, 250, 999])
    alpha, sigma = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
    sigma_flow = sigma / (alpha + sigma)
    a, s = VPAdapter.vp_coefficients(sigma_flow)
    torch.testing.assert_close(a, alpha)
    torch.testing.assert_close(s, sigma)
    torch.testing.assert_close(adapter.timestep(sigma_flow), t.double(), atol=1e-6, rtol=0)
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    x_vp = alpha[:, None] * x0 + sigma[:, None] * noise
    torch.testing.assert_close(add_noise(x0.double(), noise.double(), sigma_flow[:, None]) * (alpha + sigma)[:, None],
                               x_vp.double())


def test_guidance_one_equals_conditional_and_cfg_formula(roles):
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    adapter = roles.adapter
    cond = adapter.encode_prompts(PROMPTS)
    uncond = adapter.unconditional(len(PROMPTS))
    conditional = roles.teacher.predict(x, sigma, cond)
    torch.testing.assert_close(roles.teacher.predict(x, sigma, cond, guidance=1.0, uncond=uncond).x0,
                               conditional.x0)
    unconditional = roles.teacher.predict(x, sigma, uncond)
    guided = roles.teacher.predict(x, sigma, cond, guidance=4.5)
    expected = unconditional.x0 + 4.5 * (conditional.x0 - unconditional.x0)
    torch.testing.assert_close(guided.x0, expected, atol=1e-4, rtol=1e-4)


def test_predictions_are_batch_size_invariant(roles):
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    cond = roles.adapter.encode_prompts(PROMPTS)
    batched = roles.generator.predict(x, sigma, cond, guidance=2.0)
    for i in range(len(PROMPTS)):
        single = roles.generator.predict(x[i:i + 1], sigma[i:i + 1], cond.index(slice(i, i + 1)), guidance=2.0)
        torch.testing.assert_close(single.x0, batched.x0[i:i + 1], atol=1e-4, rtol=1e-4)


def test_roles_share_one_network_and_switch_adapters(roles):
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    cond = roles.adapter.encode_prompts(PROMPTS)
    net = roles.teacher.net
    assert roles.generator.net is net and roles.critic.net is net and roles.reference.net is net
    base = roles.teacher.predict(x, sigma, cond).x0
    generated = roles.generator.predict(x, sigma, cond).x0
    assert (generated - base).abs().max() > 1e-3, "the perturbed LoRA must change the output"
    # The reference (generator with its LoRA disabled) reproduces the base model exactly.
    torch.testing.assert_close(roles.reference.predict(x, sigma, cond).x0, base, atol=0, rtol=0)
    # A critic LoRA at scale 0 is the teacher (DMDR's real score at the end of its schedule).
    torch.testing.assert_close(roles.critic.predict(x, sigma, cond, lora_scale=0.0).x0, base, atol=0, rtol=0)
    assert (roles.critic.predict(x, sigma, cond).x0 - base).abs().max() > 1e-3


def test_only_lora_parameters_are_trainable(roles):
    generator_params = roles.generator.trainable_parameters()
    critic_params = roles.critic.trainable_parameters()
    assert generator_params and critic_params
    assert not set(map(id, generator_params)) & set(map(id, critic_params))
    lora_ids = set(map(id, generator_params)) | set(map(id, critic_params))
    frozen = [p for p in roles.teacher.net.parameters() if id(p) not in lora_ids]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert roles.teacher.trainable_parameters() == []
    for module in roles.adapter.pipeline.components.values():
        if isinstance(module, torch.nn.Module) and module is not roles.teacher.net:
            assert not any(p.requires_grad for p in module.parameters())


def test_trainable_state_dict_round_trip(roles):
    state = roles.generator.trainable_state_dict()
    assert state and all("lora" in k for k in state)
    saved = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in roles.generator.trainable_parameters():
            p.add_(1.0)
    roles.generator.load_trainable_state_dict(saved)
    for k, v in roles.generator.trainable_state_dict().items():
        torch.testing.assert_close(v, saved[k])
    with pytest.raises(UsageError, match="does not match"):
        roles.generator.load_trainable_state_dict({"nonsense.weight": torch.zeros(1)})


def test_full_critic_and_generator_are_separate_copies(tiny_pipeline_dir):
    roles = build_roles(tiny_pipeline_dir("sd3"), {"teacher": RoleSpec(init="teacher"),
                                                   "generator": RoleSpec(init="student", trainable=True),
                                                   "critic": RoleSpec(init="teacher", trainable=True)})
    teacher, generator, critic = roles["teacher"], roles["generator"], roles["critic"]
    assert len({id(teacher.net), id(generator.net), id(critic.net)}) == 3
    assert all(p.requires_grad for p in generator.trainable_parameters() + critic.trainable_parameters())
    assert not any(p.requires_grad for p in teacher.net.parameters())


def test_decode_is_differentiable(tiny_pipeline_dir):
    adapter = make_adapter(load_pipeline(tiny_pipeline_dir("sd3")))
    latents = torch.randn(1, *adapter.latent_shape(64), requires_grad=True)
    for checkpointed in (False, True):
        images = adapter.decode(latents, checkpointed=checkpointed)
        assert images.shape == (1, 3, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
        images.mean().backward()
        assert latents.grad is not None and float(latents.grad.abs().sum()) > 0
        latents.grad = None


def test_sigma_grids(tiny_pipeline_dir):
    vp = make_adapter(load_pipeline(tiny_pipeline_dir("sd")))
    assert VPAdapter.trailing_timesteps(4).tolist() == [999, 749, 499, 249]
    grid = vp.sigma_grid(4)
    torch.testing.assert_close(vp.timestep(grid[:-1]), torch.tensor([999.0, 749, 499, 249], dtype=torch.float64))
    assert grid[-1] == 0 and float(grid[0]) == pytest.approx(vp.sigma_max)
    flow = make_adapter(load_pipeline(tiny_pipeline_dir("sd3")))
    torch.testing.assert_close(flow.sigma_grid(4, shift=1.0), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))
    shifted = flow.sigma_grid(4)  # scheduler shift 3: σ = 3u / (1 + 2u)
    torch.testing.assert_close(shifted[1], torch.tensor(2.25 / 2.5, dtype=torch.float64))
    with pytest.raises(UsageError, match="flow-matching"):
        vp.sigma_grid(4, shift=3.0)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pipeline("someone/some-model")


def test_generator_lora_keeps_its_gradient_when_other_roles_run_in_between(roles):
    """DMD's generator step runs the teacher and critic (other adapters) between forward and backward."""
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    cond = roles.adapter.encode_prompts(PROMPTS)
    out = roles.generator.predict(x, sigma, cond).x0
    with torch.no_grad():
        roles.teacher.predict(x, sigma, cond)
        roles.critic.predict(x, sigma, cond)
    out.square().mean().backward()
    grads = [p.grad for p in roles.generator.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in roles.critic.trainable_parameters())
    roles.teacher.net.zero_grad(set_to_none=True)


def test_collapsed_zero_text_tokens_equal_the_padded_context(tiny_pipeline_dir):
    """SD3 without T5: one biased token computes what the pipeline's 256 zero-padding tokens compute."""
    roles = _Roles(build_roles(tiny_pipeline_dir("sd3"), {"teacher": RoleSpec()}))
    adapter, net = roles.adapter, roles.teacher.net
    x0, noise, sigma = _state(roles)
    x = add_noise(x0, noise, sigma)
    collapsed = roles.teacher.predict(x, sigma, adapter.encode_prompts(PROMPTS), guidance=3.0).x0
    assert adapter.encode_prompts(PROMPTS).embeds.shape[1] < 32
    adapter.collapse_zero_tokens = False
    adapter.clear_prompt_cache()
    net.set_attn_processor(JointAttnProcessor2_0())
    padded_cond = adapter.encode_prompts(PROMPTS)
    assert padded_cond.embeds.shape[1] > 256
    torch.testing.assert_close(roles.teacher.predict(x, sigma, padded_cond, guidance=3.0).x0, collapsed,
                               atol=1e-5, rtol=1e-4)
