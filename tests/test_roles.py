"""Roles as data (rlfew/models/roles.py): which roles share a network, float32 trainable weights under a bf16
model, the teacher's own source, per-call adapter selection that leaves no state behind, EMA copies, and the
recipe overrides of a method's role table."""

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel

import rlfew.models.roles as roles_module
from rlfew.errors import ConfigError
from rlfew.models import RoleSpec, build_roles, merge_role_specs
from rlfew.models.roles import frozen_and_trainable_dtypes
from rlfew.optim import OptimizerSettings, RoleOptimizer, backward
from rlfew.testing import save_tiny_pipeline

TEACHER = RoleSpec(init="teacher")


def dmd_table(generator_rank: int, critic_rank: int, **critic) -> dict[str, RoleSpec]:
    return {"teacher": TEACHER, "generator": RoleSpec(init="student", lora_rank=generator_rank, trainable=True),
            "critic": RoleSpec(init="teacher", lora_rank=critic_rank, trainable=True, **critic)}


@pytest.mark.parametrize("family", ["sd3", "sd"])
@pytest.mark.parametrize("generator_rank,critic_rank", [(4, 4), (4, 0), (0, 4), (0, 0)])
def test_bfloat16_model_keeps_every_trainable_parameter_in_float32(tiny_pipeline_dir, family, generator_rank,
                                                                   critic_rank):
    """H1: with model.dtype=bfloat16 the frozen weights (base weights, text encoders, VAE) are bf16 and every
    trainable parameter (LoRA or full) is fp32; on the old code every one of them was bf16."""
    roles = build_roles(tiny_pipeline_dir(family), dmd_table(generator_rank, critic_rank), dtype="bfloat16")
    dtypes = frozen_and_trainable_dtypes(roles)
    assert dtypes == {"trainable": {torch.float32}, "frozen": {torch.bfloat16}}
    assert all(p.dtype == torch.bfloat16 for n, p in roles["teacher"].net.named_parameters() if ".lora_" not in n)


def test_a_small_lora_step_changes_bfloat16_model_weights(tiny_pipeline_dir):
    """H1: AdamW at lr 1e-6 moves every LoRA tensor of a bf16 model. (In bf16 a step of 1e-6 on a weight of 0.02 is
    below half an ulp, 1.2e-4 / 2, and rounds away: the old layout changed 0 of 10 steps' entries.)"""
    roles = build_roles(tiny_pipeline_dir("sd3"), dmd_table(4, 4), dtype="bfloat16")
    generator = roles["generator"]
    with torch.no_grad():  # B is zero-initialised; give every tensor a size where bf16 would round the step away
        for param in generator.trainable_parameters():
            param.fill_(0.02)
    optimizer = RoleOptimizer("generator", generator.trainable_parameters(), OptimizerSettings(lr=1e-6))
    before = [p.detach().clone() for p in generator.trainable_parameters()]
    adapter = roles.adapter
    x = torch.randn(2, *adapter.latent_shape(adapter.default_resolution), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = generator.predict(x, 0.5, adapter.encode_prompts(["a red circle"] * 2)).x0.float().square().mean()
        backward(loss, optimizer)
        optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, generator.trainable_parameters())]
    assert all(changed), f"{sum(changed)} of {len(changed)} LoRA tensors moved"


def test_roles_share_networks_as_their_specs_say(tiny_pipeline_dir):
    sd3 = tiny_pipeline_dir("sd3")
    shared = build_roles(sd3, dmd_table(4, 4))
    assert shared.sharing() == [["teacher", "generator", "critic"]]  # one network, three adapters selections
    full = build_roles(sd3, dmd_table(0, 0))
    assert sorted(map(sorted, full.sharing())) == [["critic"], ["generator"], ["teacher"]]  # two trainable copies
    own = build_roles(sd3, dmd_table(4, 4, own_network=True))
    assert sorted(map(sorted, own.sharing())) == [["critic"], ["generator", "teacher"]]


@pytest.fixture(scope="module")
def other_sd3(tmp_path_factory) -> str:
    """A second tiny sd3 folder with other random weights (seed 1) and the same text encoder / VAE shapes."""
    return str(save_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny-sd3-seed1"), seed=1))


def transformer_weights(folder: str) -> dict[str, torch.Tensor]:
    return SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()


def test_a_full_student_from_its_own_folder_is_trained_in_place(tiny_pipeline_dir, other_sd3, monkeypatch):
    """A separate student fully fine-tuned is the one network loaded for it (no second copy of a large model), and
    it holds the student's weights while the teacher keeps its own."""
    copies, original_deepcopy = [], copy.deepcopy

    def counting_deepcopy(value, memo=None):
        if isinstance(value, torch.nn.Module):
            copies.append(type(value).__name__)
        return original_deepcopy(value, memo)

    monkeypatch.setattr(roles_module.copy, "deepcopy", counting_deepcopy)
    roles = build_roles(tiny_pipeline_dir("sd3"), dmd_table(0, 4), student_source=other_sd3)
    assert copies == []
    assert roles["generator"].net is not roles["teacher"].net and roles["generator"].trainable_parameters()
    student = transformer_weights(other_sd3)
    assert all(torch.equal(roles["generator"].net.state_dict()[name], value) for name, value in student.items())


def test_teacher_source_is_the_teacher_network(tiny_pipeline_dir, other_sd3):
    """H5: teacher.source loads the teacher's network from its own folder (the pipeline from model.source); the
    old code always took model.source's."""
    roles = build_roles(tiny_pipeline_dir("sd3"), dmd_table(4, 4), teacher_source=other_sd3)
    expected = transformer_weights(other_sd3)
    got = {n.replace(".base_layer", ""): p for n, p in roles["teacher"].net.state_dict().items() if ".lora_" not in n}
    assert got.keys() == expected.keys() and all(torch.equal(got[name], value) for name, value in expected.items())
    # the student defaults to model.source: a different network from the teacher now
    assert roles["generator"].net is not roles["teacher"].net


def test_each_call_selects_its_adapter_and_restores_the_previous_selection(tiny_pipeline_dir):
    """M6: after a role's call the shared network is back to what it was, so a direct `net(...)` call is the base
    network; the old `Role.active` left the last role's adapter switched on."""
    roles = build_roles(tiny_pipeline_dir("sd3"), dmd_table(4, 4))
    generator, teacher, critic = roles["generator"], roles["teacher"], roles["critic"]
    with torch.no_grad():
        for param in generator.trainable_parameters():
            param.add_(0.3)
        for param in critic.trainable_parameters():
            param.add_(-0.2)
    adapter = roles.adapter
    x = torch.randn(1, *adapter.latent_shape(adapter.default_resolution), generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompts(["a red circle"])
    with torch.no_grad():
        base = teacher.predict(x, 0.5, cond).x0
        with_lora = generator.predict(x, 0.5, cond).x0
        assert not torch.allclose(base, with_lora)
        direct = adapter.predict(generator.net, x, 0.5, cond).x0  # no role: whatever the network is left at
        torch.testing.assert_close(direct, base, rtol=0, atol=0)
        critic_x0 = critic.predict(x, 0.5, cond).x0
        assert not torch.allclose(critic_x0, with_lora) and not torch.allclose(critic_x0, base)
        with generator.selected():
            with critic.selected():  # nested selections unwind in order
                torch.testing.assert_close(adapter.predict(generator.net, x, 0.5, cond).x0, critic_x0, rtol=0, atol=0)
            torch.testing.assert_close(adapter.predict(generator.net, x, 0.5, cond).x0, with_lora, rtol=0, atol=0)
        torch.testing.assert_close(adapter.predict(generator.net, x, 0.5, cond).x0, base, rtol=0, atol=0)


def test_selection_matches_diffusers_set_adapters(tiny_pipeline_dir):
    """The direct switch over peft's tuner layers computes what diffusers' own set_adapters does, scale included."""
    roles = build_roles(tiny_pipeline_dir("sd3"), dmd_table(4, 4))
    critic = roles["critic"]
    with torch.no_grad():
        for param in critic.trainable_parameters():
            param.add_(0.2)
    adapter = roles.adapter
    x = torch.randn(1, *adapter.latent_shape(adapter.default_resolution), generator=torch.Generator().manual_seed(1))
    cond = adapter.encode_prompts(["two blue squares"])
    with torch.no_grad():
        ours = critic.predict(x, 0.4, cond, lora_scale=0.75).x0
        net = critic.net
        net.enable_adapters()
        net.set_adapters(["critic"], weights=[0.75])
        reference = adapter.predict(net, x, 0.4, cond).x0
        net.disable_adapters()
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("generator_rank", [4, 0])
def test_an_ema_copy_follows_its_role_by_the_decay(tiny_pipeline_dir, generator_rank):
    table = {**dmd_table(generator_rank, 4), "generator_ema": RoleSpec(ema_of="generator", ema_decay=0.9)}
    roles = build_roles(tiny_pipeline_dir("sd3"), table, dtype="bfloat16")
    generator, ema = roles["generator"], roles["generator_ema"]
    assert not ema.trainable and ema.trainable_parameters() == []
    assert not any(p.requires_grad for p in ema.trainable_state_dict().values())
    start = {k: v.clone() for k, v in ema.trainable_state_dict().items()}
    assert all(v.dtype == torch.float32 for v in start.values() if v.is_floating_point())
    with torch.no_grad():
        for param in generator.trainable_parameters():
            param.add_(1.0)
    roles.update_ema("generator_ema")
    for (name, value), source in zip(ema.trainable_state_dict().items(), generator.trainable_state_dict().values()):
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * source)
    assert roles.ema_roles("generator") == ["generator_ema"]


def test_recipe_overrides_of_the_role_table():
    declared = dmd_table(16, 16)
    merged = merge_role_specs(declared, {"critic": {"lora_rank": 0, "lr": 2e-5}, "generator_ema": {"ema_of": "generator"}},
                              "dmd")
    assert merged["critic"].lora_rank == 0 and merged["critic"].lr == 2e-5 and merged["generator"].lora_rank == 16
    assert merged["generator_ema"].ema_of == "generator"
    for overrides, named in [({"critic": {"trainable": False}}, "roles.critic.trainable"),
                             ({"critic": {"lora_rnk": 4}}, "roles.critic"),
                             ({"surrogate": {"lora_rank": 4}}, "no role 'surrogate'"),
                             ({"critic": {"init": "nowhere"}}, "roles.critic.init"),
                             ({"critic": {"dtype": "bfloat16"}}, "roles.critic.dtype"),
                             ({"generator_ema": {"ema_of": "teacher"}}, "roles.generator_ema.ema_of"),
                             ({"critic": {"betas": [0.9]}}, "roles.critic.betas")]:
        with pytest.raises(ConfigError, match=named):
            merge_role_specs(declared, overrides, "dmd")


def test_roles_on_one_network_cannot_ask_for_two_dtypes(tiny_pipeline_dir, other_sd3):
    """A bf16 teacher is its own network only when the student has its own source; on one shared network the
    generator's base would silently become bf16 on the learner but stay model.dtype on a rollout worker that builds
    the generator alone."""
    table = dmd_table(4, 4)
    table["teacher"] = RoleSpec(init="teacher", dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"roles.teacher.dtype: bfloat16 would also be the frozen base of role "
                                          r"'generator'"):
        build_roles(tiny_pipeline_dir("sd3"), table)
    learner = build_roles(tiny_pipeline_dir("sd3"), table, student_source=other_sd3)
    worker = build_roles(tiny_pipeline_dir("sd3"), {"generator": table["generator"]}, student_source=other_sd3)
    base = lambda roles: {p.dtype for n, p in roles["generator"].net.named_parameters() if ".lora_" not in n}  # noqa: E731
    assert base(learner) == base(worker) == {torch.float32}
    assert {p.dtype for n, p in learner["teacher"].net.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    table["reference"] = RoleSpec(init="teacher", dtype="float16")
    with pytest.raises(ConfigError, match="roles.reference.dtype: float16 conflicts with bfloat16 of role 'teacher'"):
        build_roles(tiny_pipeline_dir("sd3"), table, student_source=other_sd3)


def test_an_ema_copy_takes_everything_from_its_role():
    declared = dmd_table(16, 16)
    for fields, named in [({"ema_of": "generator", "lora_rank": 4}, "roles.generator_ema.lora_rank"),
                          ({"ema_of": "generator", "lr": 1e-3}, "roles.generator_ema.lr")]:
        with pytest.raises(ConfigError, match=named):
            merge_role_specs(declared, {"generator_ema": fields}, "dmd")
    with pytest.raises(ConfigError, match="roles.critic.ema_decay"):
        merge_role_specs(declared, {"critic": {"ema_decay": 0.9}}, "dmd")
    with pytest.raises(ConfigError, match="roles.critic.lora_scale"):
        merge_role_specs(declared, {"critic": {"lora_scale": 0.0}}, "dmd")
