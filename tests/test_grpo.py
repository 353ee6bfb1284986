"""GRPO (algos/grpo.py): ALGORITHMS.md §5.8's tests (the kernels' own closed forms, tests 1, 2 and 8, live in
test_sampling.py; advantages, test 4, in test_advantages.py), the policy conformance kit on every family rlfew
ships, the composition with the DMD regulariser, recipes through the config path, and `rlfew train --algo grpo`
through Ray with two learners and with a reward plug-in that is a plain function."""

import json
import math
from pathlib import Path

import pytest
import torch

from rlfew.algos.distribution_matching import (distribution_matching_loss, fraction_to_sigma, standard_normal,
                                               uniform_fractions)
from rlfew.algos.grpo import GRPO, GRPOOptions, gaussian_kl_same_std, ppo_clipped_loss, window_start
from rlfew.cli import main
from rlfew.config import load_config
from rlfew.conformance import ConformanceError, check_policy_conformance
from rlfew.errors import ConfigError
from rlfew.method import build_method, resolve_method
from rlfew.models import RoleSpec, build_roles
from rlfew.optim import backward
from rlfew.sampling import CPS
from rlfew.testing import TINY_FAMILIES, rollout_batch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ the math

def test_same_variance_kl_matches_a_monte_carlo_estimate():
    """§5.8 test 3: ‖Δμ‖²/(2Σ²) (mean over dims) against E_p[log p − log q] from 400k samples."""
    gen = torch.Generator().manual_seed(0)
    mean, reference = torch.randn(2, 6, generator=gen, dtype=torch.float64), torch.randn(2, 6, generator=gen,
                                                                                        dtype=torch.float64)
    std = torch.tensor(0.8, dtype=torch.float64)
    closed = gaussian_kl_same_std(mean, reference, std)
    x = mean + std * torch.randn(400_000, 2, 6, generator=gen, dtype=torch.float64)
    log_ratio = (-(x - mean) ** 2 + (x - reference) ** 2) / (2 * std**2)  # log p − log q, elementwise
    monte_carlo = log_ratio.mean(0).mean(-1)
    torch.testing.assert_close(closed, monte_carlo, rtol=0.02, atol=2e-3)
    assert float(gaussian_kl_same_std(mean, mean, std).abs().max()) == 0.0


def test_ppo_clip_gradient_at_one_and_where_the_clip_binds():
    """§5.8 test 5: at ρ = 1 the gradient w.r.t. log π is −A; for A > 0 and ρ > 1 + ε (and A < 0, ρ < 1 − ε) it is
    0; for A < 0 and ρ > 1 + ε the unclipped term is the minimum and the gradient is −A·ρ."""
    eps = 0.1
    advantages = torch.tensor([2.0, -3.0, 1.5, -0.5, -2.0])
    log_ratio = torch.tensor([0.0, 0.0, math.log(1.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    ppo_clipped_loss(log_ratio.exp(), advantages, eps).sum().backward()
    expected = torch.tensor([-2.0, 3.0, 0.0, 0.0, 2.0 * 1.5])
    torch.testing.assert_close(log_ratio.grad, expected)


class MixGRPOWindow:
    """MixGRPO's GRPOTrainingStates (progressive, prog_overlap, roll_back), stateful, as its trainer drives it:
    read the window, train, then update_iteration()."""

    def __init__(self, iters_per_group, group_size, max_timesteps, step):
        self.every, self.size, self.max, self.step = iters_per_group, group_size, max_timesteps, step
        self.start, self.count = 0, 0

    def window(self):
        return list(range(self.start, min(self.start + self.size, self.max)))

    def update(self):
        self.count += 1
        if self.count >= self.every:
            self.count = 0
            self.start += self.step
            if self.start > self.max - 1:
                self.start = 0


@pytest.mark.parametrize("every,size,candidates,stride", [(25, 4, 23, 1), (20, 4, 23, 1), (3, 2, 7, 2), (1, 1, 3, 1)])
def test_progressive_window_follows_mixgrpo_over_300_iterations(every, size, candidates, stride):
    """§5.8 test 6: the stateless schedule equals MixGRPO's stateful one, roll-back included."""
    reference = MixGRPOWindow(every, size, candidates, stride)
    options = GRPOOptions(window="progressive", window_size=size, window_every=every, window_stride=stride)
    for step in range(300):
        assert GRPO.trained_steps(step, candidates + 1, options, seed=0) == reference.window(), step
        reference.update()


def test_random_window_is_a_function_of_seed_and_step_inside_the_range():
    starts = [window_start(step, "random", 2, 5, seed=3) for step in range(200)]
    assert starts == [window_start(step, "random", 2, 5, seed=3) for step in range(200)]
    assert set(starts) == {0, 1, 2, 3}
    assert starts != [window_start(step, "random", 2, 5, seed=4) for step in range(200)]


# ------------------------------------------------------------------------------- on tiny real pipelines

def grpo_config(tiny_config, family="sd3", *overrides):
    return tiny_config(family, "algo.name=grpo", "reward=jpeg", "train.group_size=4", "generator.steps=4",
                       "roles.generator.lora_rank=4", *overrides)


def test_window_steps_are_the_only_stochastic_ones_and_branches_share_their_state(tiny_config):
    """§5.8 tests 6–7 on a rollout: outside the window Σ = 0; with TempFlow branching the group shares its initial
    noise, so its branches are equal up to the branch step exactly and differ after it; noise-aware weights are
    Σ_k / mean Σ over the steps a window can pick (mean 1)."""
    cfg = grpo_config(tiny_config, "sd3", "algo.options={reg: none, window: progressive, window_every: 2, "
                                          "branching: true, noise_aware_weights: true}")
    method = build_method(cfg)
    for step, branch in [(0, 0), (2, 1), (4, 2), (6, 0)]:
        trajectory = rollout_batch(method, step, PROMPTS, group_size=4).trajectory
        assert trajectory.stochastic.tolist() == [k == branch for k in range(4)]
        assert [bool(s > 0) for s in trajectory.stds] == [k == branch for k in range(4)]
        group = trajectory.states[:4]
        assert torch.equal(group[:, branch], group[:1, branch].expand_as(group[:, branch]))
        assert not torch.equal(group[0, branch + 1], group[1, branch + 1])
    weights = method.step_weights(trajectory, [0, 1, 2])
    stds = [trajectory.kernel.std(float(trajectory.sigmas[k]), float(trajectory.sigmas[k + 1])) for k in range(3)]
    assert sum(weights.values()) / 3 == pytest.approx(1.0)
    assert [weights[k] / weights[0] for k in range(3)] == pytest.approx([s / stds[0] for s in stds])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_conformance_kit_on_every_family(family, tiny_pipeline_dir):
    """η = 0 is the deterministic sampler, ρ = 1 exactly at the stored states, batch-size invariance and the
    analytic Gaussian, for the three kernels, on a LoRA generator of every family rlfew ships."""
    generator = build_roles(tiny_pipeline_dir(family),
                            {"generator": RoleSpec(init="student", lora_rank=4, trainable=True)})["generator"]
    report = check_policy_conformance(generator)
    assert report["eta0_vs_deterministic"] <= 1e-5
    assert {key.split("/")[0] for key in report if "/" in key} == {"cps", "flow_grpo", "dance_grpo"}


def test_conformance_kit_fails_a_family_whose_x0_and_velocity_disagree(tiny_pipeline_dir):
    """The kit can fail: an adapter whose x̂0 is off by a constant breaks η = 0 ≡ deterministic."""
    generator = build_roles(tiny_pipeline_dir("sd3"), {"generator": RoleSpec(init="student")})["generator"]

    class Skewed:
        adapter = generator.adapter

        def predict(self, x, sigma, cond, guidance=1.0, uncond=None):
            prediction = generator.predict(x, sigma, cond, guidance, uncond)
            prediction.x0 = prediction.x0 + 0.1
            return prediction

    with pytest.raises(ConformanceError, match="eta 0"):
        check_policy_conformance(Skewed())


def _same_generator_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.roles["generator"].trainable_parameters(),
                                                 b.roles["generator"].trainable_parameters()))


def test_the_first_inner_epoch_is_on_policy_and_later_ones_move_the_ratio(tiny_config):
    cfg = grpo_config(tiny_config, "sd3", "algo.options={reg: none, inner_epochs: 3, clip_range: 1.0e-6}",
                      "train.lr=1e-2")
    method = build_method(cfg)
    batch = rollout_batch(method, 0, PROMPTS, group_size=4, scores={"jpeg": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.8, 0.1]})
    result = method.train_step(batch)
    assert result.metrics["ppo/log_ratio_abs"] == 0.0 and result.metrics["ppo/clip_fraction"] == 0.0
    assert result.metrics["ppo/last_epoch_clip_fraction"] > 0 and not result.skipped


def test_dmd_regulariser_at_weight_zero_is_pure_grpo(tiny_config):
    """§5.8 test 9a: λ_DMD = 0 gives the generator exactly reg none's update (bit-exact)."""
    scores = {"jpeg": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.8, 0.1]}
    common = ("roles.generator.lora_rank=0", "train.lr=1e-3")
    plain = build_method(grpo_config(tiny_config, "sd3", *common, "algo.options={reg: none}"))
    zero = build_method(grpo_config(tiny_config, "sd3", *common, "algo.options={reg: dmd, reg_weight: 0.0}"))
    assert _same_generator_weights(plain, zero)
    plain.train_step(rollout_batch(plain, 0, PROMPTS, group_size=4, scores=scores))
    result = zero.train_step(rollout_batch(zero, 0, PROMPTS, group_size=4, scores=scores))
    assert result.metrics["loss/dmd"] > 0  # the DM term was computed, with weight 0
    assert _same_generator_weights(plain, zero)


def test_zero_advantages_give_exactly_the_dmd_update(tiny_config):
    """§5.8 test 9b: A ≡ 0 (every group flat) leaves only λ·mean_k L_DM(x̂0_k), computed here by hand from the same
    streams: the generator's weights after the step are bit-exact."""
    cfg = grpo_config(tiny_config, "sd3", "roles.generator.lora_rank=0", "train.lr=1e-3",
                      "algo.options={reg: dmd, reg_weight: 2.0}")
    flat = {"jpeg": [0.4] * 8}
    method, manual = build_method(cfg), build_method(cfg)
    batch = rollout_batch(method, 0, PROMPTS, group_size=4, scores=flat)
    assert float(batch.trajectory.advantages.abs().max()) == 0.0
    method.train_step(batch)

    batch = rollout_batch(manual, 0, PROMPTS, group_size=4, scores=flat)
    trajectory, adapter, generator = batch.trajectory, manual.roles.adapter, manual.roles["generator"]
    steps = [0, 1, 2]
    sigma = {k: fraction_to_sigma(adapter, uniform_fractions(8, batch.rng, 0.02, 0.98), resolution=manual.resolution)
             for k in steps}
    noise = {k: standard_normal(trajectory.x0_preds[:, k].shape, batch.rng).to(trajectory.x0_preds) for k in steps}
    for k in steps:
        x = generator.predict(trajectory.states[:, k].double(), float(trajectory.sigmas[k]), batch.cond).x0
        loss, _ = distribution_matching_loss(x, batch.cond, sigma[k], noise[k], manual.real_x0, manual.roles["critic"])
        backward(2.0 * loss / len(steps), manual.optimizers["generator"])
    manual.optimizers["generator"].step()
    assert _same_generator_weights(method, manual)


def test_kl_reference_is_the_generator_with_its_lora_off(tiny_config):
    """At initialisation (LoRA B = 0) the policy is the reference: KL exactly 0; after updates it is positive, and
    the reference itself has not moved."""
    cfg = grpo_config(tiny_config, "sd3", "algo.options={reg: kl, reg_weight: 0.04}", "train.lr=1e-2")
    method = build_method(cfg)
    scores = {"jpeg": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.8, 0.1]}
    first = method.train_step(rollout_batch(method, 0, PROMPTS, group_size=4, scores=scores))
    assert first.metrics["loss/kl"] == 0.0
    later = method.train_step(rollout_batch(method, 1, PROMPTS, group_size=4, scores=scores))
    assert later.metrics["loss/kl"] > 0.0
    assert method.roles["reference"].lora is None and not method.roles["reference"].trainable_parameters()


@pytest.mark.parametrize("override,key", [
    ("algo.options={train_steps: [3]}", "algo.options.train_steps"),
    ("algo.options={kernel: flow_grpo, eta: 0.5}", "algo.options.eta"),
    ("algo.options={kernel: cps, noise_level: 0.5}", "algo.options.noise_level"),
    ("algo.options={branching: true}", "algo.options.branching"),
    ("algo.options={window: progressive, window_size: 4}", "algo.options.window_size"),
    ("algo.options={reg: l2}", "algo.options.reg"),
    ("algo.options={clip_range: 0}", "algo.options.clip_range"),
    ("algo.options={eta: 1.5}", "algo.options.eta"),
    ("train.group_size=1", "train.group_size"),
    ("generator.steps=1", "generator.steps"),
])
def test_bad_options_are_refused_naming_the_key(tiny_config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_method(grpo_config(tiny_config, "sd3", override))


def test_a_method_without_a_reward_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="reward"):
        resolve_method(tiny_config("sd3", "algo.name=grpo", "train.group_size=4"))


# ------------------------------------------------------------------------------------------- recipes

def test_world_recipe_loads_and_validates():
    """configs/world/grpo.yaml needs the world assets to run; its config must already be valid."""
    cfg = load_config(REPO / "configs" / "world" / "grpo.yaml")
    resolved = resolve_method(cfg)
    assert (cfg.algo.name, cfg.generator.source, [e.name for e in cfg.reward]) == ("grpo", "world:student", ["world"])
    assert resolved.options.reg == "dmd" and resolved.spec.rewards == "workers"
    assert resolved.spec.rollout(0).stochastic_steps == [0, 1, 2] and isinstance(resolved.spec.rollout(0).sampler, CPS)


RECIPES = [("sd-turbo", "sd", "jpeg"), ("sdxl-turbo", "sdxl", "pickscore"), ("sd35", "sd3", "ocr")]


@pytest.mark.parametrize("recipe,family,reward", RECIPES)
def test_real_model_recipe_trains_on_a_tiny_pipeline_of_its_family(recipe, family, reward, tiny_pipeline_dir,
                                                                   tmp_path):
    """The recipe as written, with the model, the reward (a cheap one in place of the hub checkpoints), the sizes and
    the prompts swapped; the recipe's own reward is the one it names."""
    path = REPO / "configs" / recipe / "grpo.yaml"
    assert [entry.name for entry in load_config(path).reward] == [reward]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = main(["train", str(path), f"model.source={tiny_pipeline_dir(family)}", "generator.source=null",
                 "model.resolution=null", "model.dtype=float32", "reward=jpeg", "train.steps=2",
                 "train.prompts_per_step=2", "train.group_size=2", "train.micro_batch_size=null", "train.log_every=1",
                 "train.sample_every=0", "train.save_every=2", f"train.prompts={prompts}", f"eval.prompts={prompts}",
                 "runtime.backend=inprocess", f"run.output_dir={tmp_path}", "run.name=recipe"])
    assert code == 0
    records = read_metrics(tmp_path / "recipe")
    assert [r["updated/generator"] for r in records] == [1.0, 1.0]
    assert all(r["ppo/log_ratio_abs"] == 0.0 for r in records)


# ----------------------------------------------------------------------------------- rlfew train --algo grpo

def mean_red(images, prompts):
    """A reward plug-in that is a plain function: the mean red channel."""
    return images[:, 0].flatten(1).mean(1)


@pytest.mark.ray
@pytest.mark.parametrize("reward", ["world", "test_grpo:mean_red"])
def test_grpo_trains_through_ray_with_two_learners(reward, tiny_pipeline_dir, tmp_path, ray_with_tests_importable):
    """`rlfew train --algo grpo` through Ray, 2 learners, 4 groups of 2 (whole on each learner), reg dmd, with the
    world's exact evaluator and with a reward that is a plain Python function: every update is applied, on-policy
    in its first epoch (ρ = 1 exactly after the trajectory travelled through the object store), with the DM term
    and the reward logged."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red circle", "two squares", "a green triangle", "a purple square"]) + "\n")
    code = main(["train", f"model.source={tiny_pipeline_dir('sd3')}", "--algo", "grpo", "--reward", reward,
                 "generator.steps=2", "train.group_size=2", "train.prompts_per_step=4",
                 "train.steps=3", "train.lr=1e-3", "train.log_every=1", "train.sample_every=0", "train.save_every=3",
                 f"train.prompts={prompts}", f"eval.prompts={prompts}", "runtime.backend=ray", "runtime.num_learners=2",
                 "algo.options={clip_range: 0.2}", f"run.output_dir={tmp_path}", "run.name=grpo"])
    assert code == 0
    records = read_metrics(tmp_path / "grpo")
    assert len(records) == 3 and all(r["updated/generator"] == 1.0 for r in records)
    assert all(r["loss/dmd"] > 0 and r["ppo/log_ratio_abs"] == 0.0 and f"reward/{reward}" in r for r in records)
    assert (tmp_path / "grpo" / "checkpoints" / "step_3").is_dir()
