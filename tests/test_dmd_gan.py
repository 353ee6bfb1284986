"""DMD2's optional GAN head (ALGORITHMS.md §1.4, algos/gan.py): the logistic losses against their closed forms,
the critic's bottleneck features for every family, the head trained with the critic through real roles, resume,
and the real-image sources (world renders, an image folder) with their errors."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rlfew.algos.gan import (DiscriminatorHead, GANOptions, bottleneck_features, discriminator_loss,
                             generator_adversarial_loss)
from rlfew.checkpoint import load_checkpoint, save_checkpoint
from rlfew.errors import ConfigError, UsageError
from rlfew.method import build_method, get_method
from rlfew.models import RoleSpec, build_roles, tokens_to_map
from rlfew.real_images import ImageFolder, WorldRenders, load_real_images
from rlfew.testing import rollout_batch
from rlfew.world.evaluator import evaluate

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture
def gan_method(tiny_config):
    """`gan_method(family, critic_rank, ttur, *option_strings, overrides=())`: DMD with a LoRA generator and the GAN
    head at λ_G 0.1, λ_D 1."""
    def build(family="sd3", critic_rank=0, ttur=2, *options: str, overrides: tuple[str, ...] = ()):
        algo = ", ".join([f"ttur: {ttur}", "gan_generator_weight: 0.1", "gan_critic_weight: 1.0", *options])
        return build_method(tiny_config(family, "roles.generator.lora_rank=4", f"roles.critic.lora_rank={critic_rank}",
                                        f"algo.options={{{algo}}}", *overrides))
    return build


def run_iteration(method, step: int) -> dict[str, float]:
    return method.train_step(rollout_batch(method, step, PROMPTS)).metrics


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def moved(before, params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params))


# ------------------------------------------------------------------------------------------- losses

def test_losses_match_their_closed_forms():
    logits = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    loss = generator_adversarial_loss(logits)
    assert loss.item() == pytest.approx(np.mean(np.log1p(np.exp([2.0, 0.0, -3.0]))), rel=1e-6)
    loss.backward()  # d/dl softplus(−l) = −sigmoid(−l): pushes D(fake) up
    assert torch.allclose(logits.grad, -torch.sigmoid(-logits.detach()) / 3)
    real, fake = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    d_loss = discriminator_loss(real, fake)
    assert d_loss.item() == pytest.approx(2 * math.log(2))
    d_loss.backward()  # at 0 both sides get ±½ per element: real logits up, fake logits down
    assert torch.allclose(real.grad, torch.full((4,), -0.5 / 4)) and torch.allclose(fake.grad, torch.full((4,), 0.5 / 4))
    assert discriminator_loss(torch.full((2,), 30.0), torch.full((2,), -30.0)).item() < 1e-12  # a perfect D


def test_gan_options_are_validated():
    with pytest.raises(ConfigError, match="gan_critic_weight"):
        get_method("dmd").Options(gan_critic_weight=-1.0)
    with pytest.raises(ConfigError, match="gan_sigma_range"):
        get_method("dmdr").Options(gan_sigma_range=[0.5, 0.2])
    assert GANOptions().gan_generator_weight == 0.0  # off unless asked for
    with pytest.raises(ConfigError, match="gan_head_downsamples"):
        get_method("dmd").Options(gan_head_downsamples=-1)


def test_train_checks_the_real_image_folder_before_writing_anything(tmp_path, capsys):
    from rlfew.cli import main

    code = main(["train", "configs/world/dmd.yaml", "runtime.backend=inprocess", f"run.output_dir={tmp_path / 'runs'}",
                 "algo.options.gan_generator_weight=1e-3", f"algo.options.gan_real_images={tmp_path / 'nowhere'}"])
    assert code == 2 and "algo.options.gan_real_images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_head_sizes_its_downsampling_to_the_feature_map():
    assert DiscriminatorHead(64, spatial=8)(torch.randn(2, 64, 8, 8)).shape == (2, 1, 2, 2)  # two strided convs
    assert DiscriminatorHead(12, spatial=2)(torch.randn(2, 12, 2, 2)).shape == (2, 1, 1, 1)  # capped at 1x1
    assert DiscriminatorHead(12, spatial=1)(torch.randn(2, 12, 1, 1)).shape == (2, 1, 1, 1)
    assert DiscriminatorHead(8, spatial=16, max_downsamples=4)(torch.randn(2, 8, 16, 16)).shape == (2, 1, 1, 1)
    head = DiscriminatorHead(32, spatial=4)  # down to 1x1: the normalisation must not make the logit constant
    logits = head(torch.randn(4, 32, 4, 4)).flatten()
    assert logits.std() > 1e-3


# --------------------------------------------------------------------------------- critic features

def test_tokens_to_map_inverts_patch_embedding_flattening():
    conv = torch.nn.Conv2d(4, 6, 2, stride=2)  # as diffusers' PatchEmbed: proj, then flatten(2).transpose(1, 2)
    grid = conv(torch.randn(3, 4, 8, 6))
    assert torch.equal(tokens_to_map(grid.flatten(2).transpose(1, 2), 4, 3), grid)
    with pytest.raises(ValueError, match="grid"):
        tokens_to_map(torch.zeros(1, 10, 6), 4, 3)


def test_tokens_to_map_of_flux_packed_latents_is_a_pixel_unshuffle(tiny_pipeline_dir):
    adapter = build_roles(tiny_pipeline_dir("flux"), {"teacher": RoleSpec()}).adapter
    x = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(tokens_to_map(adapter.pack(x), 4, 3), torch.nn.functional.pixel_unshuffle(x, 2),
                               atol=0, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "sd", "sdxl", "flux"])
def test_bottleneck_features_are_the_middle_block_output_and_stop_the_forward(tiny_pipeline_dir, family):
    roles = build_roles(tiny_pipeline_dir(family), {"critic": RoleSpec(trainable=True)})
    critic, adapter = roles["critic"], roles.adapter
    x = torch.randn(2, *adapter.latent_shape(adapter.default_resolution))
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    block = adapter.bottleneck(critic.net)
    seen = []
    handle = block.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        critic.predict(x, 0.5, cond)  # a full forward, for reference
    finally:
        handle.remove()
    reference = seen[0] if family in ("sd", "sdxl") else seen[0][1]
    features = bottleneck_features(critic, x, torch.full((2,), 0.5), cond)
    assert features.ndim == 4 and features.shape[0] == 2
    assert torch.equal(features.flatten(2).transpose(1, 2) if family not in ("sd", "sdxl") else features,
                       reference.float())
    out_layer = critic.net.conv_out if family in ("sd", "sdxl") else critic.net.proj_out
    calls = []
    handle = out_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        bottleneck_features(critic, x, torch.full((2,), 0.5), cond)
    finally:
        handle.remove()
    assert not calls  # the layers after the bottleneck never ran
    assert not block._forward_hooks  # and the stopping hook is gone


# ------------------------------------------------------------------------------------ in the method

@pytest.mark.parametrize("family,critic_rank", [("sd3", 0), ("sd3", 4), ("sd", 0)])
def test_gan_head_trains_with_the_critic_and_joins_the_generator_loss(gan_method, family, critic_rank):
    method = gan_method(family, critic_rank)
    head = method.optimizers["discriminator"].params
    assert {id(p) for p in head} == {id(p) for p in method.gan.head.parameters()}  # its own optimiser
    teacher = [p for n, p in method.roles["teacher"].net.named_parameters() if ".lora_" not in n]
    teacher_before = snapshot(teacher)
    for step in range(4):
        head_before = snapshot(head)
        metrics = run_iteration(method, step)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert moved(head_before, head)  # every critic turn trains the head
        assert metrics["loss/critic"] == pytest.approx(
            metrics["loss/critic_denoising"] + 1.0 * metrics["loss/gan_critic"], rel=1e-5)  # λ_D = 1
        if step % 2 == 0:
            assert metrics["loss/generator"] == pytest.approx(
                metrics["loss/dmd"] + 0.1 * metrics["loss/gan_generator"], rel=1e-5)  # λ_G = 0.1
    assert not moved(teacher_before, teacher)
    assert {name: opt.steps for name, opt in method.optimizers.items()} == {"generator": 2, "critic": 4,
                                                                             "discriminator": 4}


@pytest.mark.parametrize("weight", [1.0, 1e-12])
def test_generator_gradient_carries_the_adversarial_term(gan_method, monkeypatch, weight):
    """With the DM direction switched off (its loss is then exactly 0) and no weight decay, only the adversarial
    term can move the generator: it does with λ_G = 1, and (all but) not with λ_G = 1e-12. The generator step
    leaves the critic and the head untouched, without gradients."""
    import rlfew.algos.distribution_matching as distribution_matching

    method = gan_method("sd3", 0, 2, f"gan_generator_weight: {weight}", overrides=("train.weight_decay=0",))
    monkeypatch.setattr(distribution_matching, "dmd_direction",
                        lambda x, *args, **kwargs: torch.zeros_like(x, dtype=torch.float64))
    others = method.optimizers["critic"].params + method.optimizers["discriminator"].params
    generator = method.optimizers["generator"]
    before, others_before = snapshot(generator.params), snapshot(others)
    after_generator_step = {}
    step = generator.step

    def spy():
        result = step()
        after_generator_step.update(others=snapshot(others), grads=[p.grad for p in others])
        return result

    monkeypatch.setattr(generator, "step", spy)
    metrics = run_iteration(method, 0)
    assert metrics["loss/dmd"] == 0.0 and metrics["loss/gan_generator"] > 0
    change = max((a - b).abs().max().item() for a, b in zip(before, generator.params))
    assert change > 1e-6 if weight == 1.0 else change < 1e-9
    assert not moved(others_before, after_generator_step["others"])
    assert all(grad is None for grad in after_generator_step["grads"])


def test_discriminator_learns_to_tell_world_renders_from_generator_samples(gan_method):
    """Critic turns only (the generator turn comes once): the head must separate real renders from the random
    tiny generator's samples, i.e. D(real) ends well above D(fake)."""
    method = gan_method("sd3", 0, 10_000, "gan_sigma_range: [0.0, 0.3]")
    gaps = [(m["gan/real_logit"] - m["gan/fake_logit"]) for m in (run_iteration(method, s) for s in range(30))]
    # seen (seed 0): first gap 0.02, mean of the last 5 ≈ 2.4
    assert np.mean(gaps[-5:]) > 1.0 > abs(np.mean(gaps[:1]))


def test_resume_with_a_gan_head_is_bit_exact(gan_method, tmp_path):
    original = gan_method()
    for step in range(3):
        run_iteration(original, step)
    state = original.state_dict()
    assert "discriminator" in state["tensors"]
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 3, state["tensors"], state["state"]))
    resumed = gan_method()
    resumed.load_state_dict({"tensors": checkpoint.tensors, "state": checkpoint.state})
    for step in (3, 4):
        assert run_iteration(resumed, step) == run_iteration(original, step)
    assert all(torch.equal(a, b) for a, b in zip(original.gan.head.parameters(), resumed.gan.head.parameters()))

    with pytest.raises(UsageError, match="discriminator"):
        gan_method("sd3", 0, 2, "gan_generator_weight: 0.0").load_state_dict(
            {"tensors": checkpoint.tensors, "state": checkpoint.state})


def test_a_run_without_the_head_resumes_with_a_fresh_one(gan_method, tmp_path):
    """DMD2's SD1.5 protocol: distil without the GAN, then resume with it. The critic's optimiser state carries
    over; the head starts fresh and trains."""
    plain = gan_method("sd3", 0, 2, "gan_generator_weight: 0.0")
    for step in range(2):
        run_iteration(plain, step)
    state = plain.state_dict()
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 2, state["tensors"], state["state"]))
    with_head = gan_method()
    with_head.load_state_dict({"tensors": checkpoint.tensors, "state": checkpoint.state})
    critic_state = with_head.optimizers["critic"].optimizer.state_dict()["state"]
    assert torch.equal(critic_state[0]["exp_avg"], plain.optimizers["critic"].optimizer.state_dict()["state"][0]["exp_avg"])
    assert with_head.optimizers["discriminator"].steps == 0
    head_before = snapshot(with_head.gan.head.parameters())
    metrics = run_iteration(with_head, 2)
    assert math.isfinite(metrics["loss/gan_critic"]) and moved(head_before, with_head.gan.head.parameters())


def test_uncaptioned_folder_puts_real_and_fake_through_the_empty_prompt(gan_method, tmp_path):
    for index in range(3):
        Image.fromarray(np.full((40, 24, 3), 60 * index, dtype=np.uint8)).save(tmp_path / f"{index}.png")
    method = gan_method("sd3", 0, 2, f"gan_real_images: '{tmp_path}'")
    assert not method.gan.real_images.captioned
    cond = method.roles.adapter.encode_prompts(["a red circle", "a blue square"])
    empty = method.gan._fake_cond(cond)
    assert torch.equal(empty.embeds, method.roles.adapter.unconditional(2).embeds)
    metrics = run_iteration(method, 1)  # a critic-only iteration
    assert math.isfinite(metrics["loss/gan_critic"])


def test_real_captions_are_encoded_without_growing_the_prompt_cache(gan_method):
    method = gan_method()  # world renders: captioned
    adapter = method.roles.adapter
    cached = set(adapter._prompt_cache)
    run_iteration(method, 1)
    assert set(adapter._prompt_cache) == cached | {"a red circle", "two blue squares"}  # the batch's prompts only
    fresh = adapter.encode_prompts(["a green circle"], cache=False)
    assert "a green circle" not in adapter._prompt_cache
    assert torch.equal(fresh.embeds, adapter.encode_prompts(["a green circle"]).embeds)


# ------------------------------------------------------------------------------------- real images

def test_world_renders_are_captioned_and_reproducible():
    source = load_real_images("world:train")
    assert isinstance(source, WorldRenders) and source.captioned
    images, captions = source.sample(4, 64, torch.Generator().manual_seed(3))
    again, captions_again = source.sample(4, 64, torch.Generator().manual_seed(3))
    assert images.shape == (4, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, again) and captions == captions_again
    assert all(result.correct for result in evaluate(images, captions))  # each render shows its caption


def test_image_folder_resizes_crops_and_reads_sidecar_captions(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # a white centre band, exactly what a centre crop keeps
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(tmp_path / "grey.jpg")
    (tmp_path / "notes.md").write_text("not an image")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 2 and not folder.captioned
    crop = folder.load(folder.files.index(tmp_path / "wide.png"), 8)
    assert crop.shape == (3, 8, 8) and crop.min() > 0.9
    (tmp_path / "wide.txt").write_text("a wide band\n")
    (tmp_path / "grey.txt").write_text("grey")
    images, captions = ImageFolder(tmp_path).sample(5, 8, torch.Generator().manual_seed(0))
    assert images.shape == (5, 3, 8, 8) and set(captions) <= {"a wide band", "grey"}


def test_image_folder_errors_name_the_problem(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a caption")
    with pytest.raises(UsageError, match="1 of 2 images have no caption file.*b.txt"):
        ImageFolder(tmp_path)
    tmp_path = tmp_path / "other"
    tmp_path.mkdir()
    with pytest.raises(UsageError, match="does not exist"):
        load_real_images(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="holds no images"):
        ImageFolder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    folder = ImageFolder(tmp_path)
    with pytest.raises(UsageError, match="broken.png"):
        folder.sample(1, 8, torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match="world:train"):
        load_real_images("world:nowhere")


def test_train_with_a_gan_head_on_an_image_folder_resumes_with_the_same_metrics(tiny_pipeline_dir, tmp_path):
    """`rlfew train` end to end with the GAN head fed from a captioned image folder: the head is checkpointed, and
    a run stopped at step 2 and resumed matches an uninterrupted 4-step run."""
    import json

    from rlfew.cli import main

    images = tmp_path / "real"
    images.mkdir()
    for index, caption in enumerate(["a red circle", "a blue square"]):
        Image.fromarray(np.full((48, 48, 3), 90 * index, dtype=np.uint8)).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text(caption)
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    common = ["train", f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={tmp_path / 'prompts.txt'}",
              "train.prompts_per_step=2", "train.log_every=1", "train.sample_every=0", "train.save_every=2",
              "roles.generator.lora_rank=4", "roles.critic.lora_rank=0", "runtime.backend=inprocess",
              f"run.output_dir={tmp_path / 'runs'}",
              f"algo.options={{ttur: 2, gan_generator_weight: 0.01, gan_real_images: {images}}}"]
    assert main([*common, "train.steps=4", "run.name=straight"]) == 0
    assert main([*common, "train.steps=2", "run.name=resumed"]) == 0
    assert main([*common, "train.steps=4", "run.name=resumed", "run.resume=auto"]) == 0
    runs = tmp_path / "runs"
    assert (runs / "straight" / "checkpoints" / "step_4" / "discriminator.safetensors").is_file()
    straight, resumed = ([json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
                         for name in ("straight", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    drop_times = lambda records: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]
    assert drop_times(resumed) == drop_times(straight)
    assert all("loss/gan_critic" in r for r in straight)
