"""The runtime–method seam, exercised by a method that only this file knows: `ProbeSurrogate` declares an extra
trainable LoRA role on the teacher (a surrogate) and an EMA copy of it, trains on worker-scored rewards through
group advantages, and reports what it received. Through `rlfew train` it trains and resumes bit-exactly; through
the driver it shows that advantages are computed on the whole batch before sharding (H3), that groups stay whole
on one learner and in one micro-batch, that metrics come from every learner (M7), that a skipped update is an
explicit field (M4), and how stale rollouts are under runtime.max_staleness."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlfew.algos.advantages import AdvantageSpec, group_advantages
from rlfew.algos.distribution_matching import standard_normal
from rlfew.checkpoint import load_checkpoint
from rlfew.cli import main
from rlfew.config import load_config
from rlfew.errors import ConfigError, UsageError
from rlfew.method import (Batch, Method, MethodSpec, RolloutSpec, StepResult, build_method, register_method,
                          resolve_method)
from rlfew.models import RoleSpec, add_noise
from rlfew.optim import backward
from rlfew.runtime.prompts import PromptBatch, PromptSource
from rlfew.runtime.workers import draw_rollout
from rlfew.sampling import CPS
from rlfew.testing import rollout_batch

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a purple square"]


@dataclass
class ProbeOptions:
    global_std: bool = False  # flow_grpo's batch-wide std: only right if advantages see the whole batch
    skip_from_step: int = -1  # from this iteration on, report a skipped update (and no loss at all)
    nan_info_metric: bool = False  # log an informational NaN that must not count as a skipped update


@register_method
class ProbeSurrogate(Method):
    """A reward-weighted surrogate (a LoRA on the teacher) and a generator distilled from its EMA copy."""

    name = "probe_surrogate"
    Options = ProbeOptions

    @classmethod
    def spec(cls, cfg, options: ProbeOptions) -> MethodSpec:
        return MethodSpec(
            roles={"teacher": RoleSpec(init="teacher"),
                   "generator": RoleSpec(init="student", lora_rank=4, trainable=True),
                   "surrogate": RoleSpec(init="teacher", lora_rank=4, trainable=True, lr=5e-3),
                   "surrogate_ema": RoleSpec(ema_of="surrogate", ema_decay=0.5)},
            rollout=lambda step: RolloutSpec(sampler=CPS(eta=0.5), stochastic_steps=[0]),
            rewards="workers", advantages=AdvantageSpec(std="global" if options.global_std else "group"))

    def train_step(self, batch: Batch) -> StepResult:
        import torch.distributed as dist

        if 0 <= self.options.skip_from_step <= batch.step:
            return StepResult({"probe/skipping": 1.0}, skipped=True)
        trajectory, cond, size = batch.trajectory, batch.cond, len(batch)
        surrogate, generator = self.roles["surrogate"], self.roles["generator"]
        # surrogate: advantage-weighted denoising of the final latents, accumulated over micro-batches
        x0 = trajectory.final_latents
        sigma = torch.rand(size, generator=batch.rng, dtype=torch.float64)
        noise = standard_normal(x0.shape, batch.rng).to(x0)
        for part in batch.micro_batches():
            prediction = surrogate.predict(add_noise(x0[part], noise[part], sigma[part]), sigma[part], cond.index(part))
            per_sample = surrogate.adapter.denoising_loss(prediction, x0[part], noise[part], sigma[part])
            backward((trajectory.advantages[part] * per_sample).sum() / size, self.optimizers["surrogate"])
        surrogate_norm, surrogate_applied = self.optimizers["surrogate"].step()
        # generator: regress its first-step x̂0 onto the EMA surrogate's
        start, sigma_start = trajectory.states[:, 0], float(trajectory.sigmas[0])
        with torch.no_grad():
            target = self.roles["surrogate_ema"].predict(start, sigma_start, cond).x0
        loss = F.mse_loss(generator.predict(start, sigma_start, cond).x0, target)
        backward(loss, self.optimizers["generator"])
        generator_norm, generator_applied = self.optimizers["generator"].step()

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        metrics = {"loss/generator": float(loss.detach()), "grad_norm/surrogate": surrogate_norm,
                   "grad_norm/generator": generator_norm, "probe/rank": float(rank)}
        groups = trajectory.group_ids.tolist()
        for index, group in enumerate(groups):  # keyed by the batch-wide group id, so ranks never collide
            member = groups[:index].count(group)
            metrics[f"probe/advantage/{group}_{member}"] = float(trajectory.advantages[index])
            metrics[f"probe/score/{group}_{member}"] = float(trajectory.scores["jpeg"][index])
            metrics[f"probe/rank_of/{group}"] = float(rank)
        if self.options.nan_info_metric:
            metrics["probe/nan_info_loss"] = math.nan
        return StepResult(metrics, skipped=not (surrogate_applied and generator_applied))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def probe_run(tiny_pipeline_dir, tmp_path_factory):
    """`probe_run(*overrides)` -> `rlfew train` arguments for the probe method on a tiny sd3 pipeline."""
    folder = tmp_path_factory.mktemp("probe")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def arguments(*overrides: str) -> list[str]:
        return ["train", f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={prompts}",
                f"eval.prompts={prompts}", "algo.name=probe_surrogate", "reward=jpeg", "train.group_size=2",
                "train.prompts_per_step=2", "generator.steps=2", "train.log_every=1", "train.sample_every=0",
                "train.save_every=2", "train.lr=1e-3", *overrides]

    return arguments


# ------------------------------------------------------------------------------- rlfew train, in-process

def test_a_method_with_its_own_lora_role_and_ema_trains_and_resumes_bit_exactly(probe_run, tmp_path):
    common = ["runtime.backend=inprocess", f"run.output_dir={tmp_path}"]
    assert main([*probe_run(*common, "train.steps=4", "run.name=straight")]) == 0
    assert main([*probe_run(*common, "train.steps=2", "run.name=resumed")]) == 0
    assert main([*probe_run(*common, "train.steps=4", "run.name=resumed", "run.resume=auto")]) == 0

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    drop_times = lambda records: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]  # noqa: E731
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and drop_times(resumed) == drop_times(straight)
    final = {name: load_checkpoint(tmp_path / name / "checkpoints" / "step_4") for name in ("straight", "resumed")}
    assert set(final["straight"].tensors) == {"generator", "surrogate", "surrogate_ema"}
    for group, tensors in final["straight"].tensors.items():
        for key, value in tensors.items():
            assert torch.equal(value, final["resumed"].tensors[group][key]), (group, key)
    # the surrogate learned, and its EMA copy followed it part of the way (decay 0.5 per step)
    surrogate, ema = final["straight"].tensors["surrogate"], final["straight"].tensors["surrogate_ema"]
    lora_b = [key for key in surrogate if "lora_B" in key]
    assert any(float(surrogate[key].abs().sum()) > 0 for key in lora_b)
    ema_key = {key: key.replace(".surrogate.", ".surrogate_ema.") for key in surrogate}
    assert any(0 < float(ema[ema_key[k]].abs().sum()) < float(surrogate[k].abs().sum()) for k in lora_b)


def test_each_group_gets_its_advantages_and_a_skipped_update_is_a_field(probe_run, tmp_path):
    """In-process, one learner: group advantages of the scores the worker computed; a method that skips without
    logging any loss still counts (M4), and an informational NaN does not abort the run."""
    common = ["runtime.backend=inprocess", f"run.output_dir={tmp_path}"]
    assert main([*probe_run(*common, "train.steps=2", "run.name=nan-info", "algo.options={nan_info_metric: true}")]) == 0
    for record in read_metrics(tmp_path / "nan-info"):
        scores = {name.split("/")[-1]: value for name, value in record.items() if name.startswith("probe/score/")}
        order = sorted(scores)
        expected = group_advantages({"jpeg": torch.tensor([scores[k] for k in order])}, {"jpeg": 1.0},
                                    torch.tensor([int(k.split("_")[0]) for k in order]), AdvantageSpec())
        got = [record[f"probe/advantage/{k}"] for k in order]
        assert got == pytest.approx(expected.values.tolist(), rel=1e-5)
        assert record["probe/nan_info_loss"] is None  # logged as null, not counted as a skipped update
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row"):
        main([*probe_run(*common, "train.steps=6", "run.name=skips", "train.max_nonfinite_steps=2",
                         "algo.options={skip_from_step: 2}")])
    assert sorted(p.name for p in (tmp_path / "skips" / "checkpoints").iterdir()) == ["step_2"]


def test_a_method_by_module_path_and_staleness_it_does_not_accept(probe_run):
    cfg = load_config(None, ["algo.name=test_method_seam:ProbeSurrogate", "reward=jpeg", "train.group_size=2"])
    assert resolve_method(cfg).cls is ProbeSurrogate
    cfg = load_config(None, ["algo.name=probe_surrogate", "reward=jpeg", "train.group_size=2",
                             "runtime.placement=disaggregated", "runtime.max_staleness=1"])
    with pytest.raises(ConfigError, match="runtime.max_staleness"):
        resolve_method(cfg)
    with pytest.raises(ConfigError, match="reward: method 'probe_surrogate' trains on rewards"):
        resolve_method(load_config(None, ["algo.name=probe_surrogate"]))
    with pytest.raises(ConfigError, match="train.group_size: .* at least 2 images per prompt"):
        resolve_method(load_config(None, ["algo.name=probe_surrogate", "reward=jpeg", "train.group_size=1"]))


# ------------------------------------------------------------------------------------------- Ray, 2 learners

@pytest.mark.ray
def test_two_learners_see_whole_groups_and_batch_wide_advantages(probe_run, tmp_path, ray_with_tests_importable):
    """H3: 4 prompts × 2 images over 2 learners in micro-batches of 2 images, with flow_grpo's global std, which is
    only right when advantages are computed on the whole batch (the old runtime had no path to advantages at
    all). Each group lives on one learner (its rank is an integer, not a mean of two) and every learner's metrics
    arrive (the mean rank is 0.5; the old driver logged rank 0 only)."""
    from rlfew.runtime.driver import Trainer

    cfg = load_config(None, probe_run("runtime.backend=ray", "runtime.num_learners=2", "train.prompts_per_step=4",
                                      "train.micro_batch_size=2", "train.steps=2",
                                      "algo.name=test_method_seam:ProbeSurrogate", "algo.options={global_std: true}",
                                      f"run.output_dir={tmp_path}", "run.name=groups")[1:])
    assert Trainer(cfg).run() == 0
    for record in read_metrics(tmp_path / "groups"):
        assert record["probe/rank"] == 0.5
        ranks = {k: v for k, v in record.items() if k.startswith("probe/rank_of/")}
        assert len(ranks) == 4 and set(ranks.values()) == {0.0, 1.0}
        keys = sorted(k.split("/")[-1] for k in record if k.startswith("probe/score/"))
        assert len(keys) == 8
        scores = torch.tensor([record[f"probe/score/{k}"] for k in keys], dtype=torch.float64)
        groups = torch.tensor([int(k.split("_")[0]) for k in keys])
        expected = group_advantages({"jpeg": scores}, {"jpeg": 1.0}, groups, AdvantageSpec(std="global"))
        assert [record[f"probe/advantage/{k}"] for k in keys] == pytest.approx(expected.values.tolist(), rel=1e-5)
        # per-shard statistics would differ: each learner's own std of its 4 scores
        shard_std = [scores[groups.numpy() < 2].std(correction=0), scores[groups.numpy() >= 2].std(correction=0)]
        assert not np.isclose(float(shard_std[0]), float(scores.std(correction=0)), rtol=1e-3)


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_resumed_disaggregated_run_with_stale_rollouts_is_bit_exact(tiny_pipeline_dir, tmp_path, staleness):
    """With max_staleness 1 the rollout of the step after a checkpoint was drawn, one update stale, before the
    checkpoint: the checkpoint keeps those weights, so the resumed run draws it as the uninterrupted one did."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["train", f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={prompts}",
              f"eval.prompts={prompts}", "train.prompts_per_step=2", "generator.steps=2", "train.log_every=1",
              "train.sample_every=0", "train.save_every=2", "runtime.backend=inprocess",
              "runtime.placement=disaggregated", f"runtime.max_staleness={staleness}", f"run.output_dir={tmp_path}",
              "algo.options={ttur: 1}"]
    assert main([*common, "train.steps=4", "run.name=straight"]) == 0
    assert main([*common, "train.steps=2", "run.name=resumed"]) == 0
    assert main([*common, "train.steps=4", "run.name=resumed", "run.resume=auto"]) == 0
    drop_times = lambda records: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]  # noqa: E731
    straight, resumed = (drop_times(read_metrics(tmp_path / name)) for name in ("straight", "resumed"))
    assert resumed == straight
    assert [r["rollout/weights_lag"] for r in resumed] == ([0.0, 1.0, 1.0, 1.0] if staleness else [0.0] * 4)
    final = [load_checkpoint(tmp_path / name / "checkpoints" / "step_4").tensors["generator"]
             for name in ("straight", "resumed")]
    assert all(torch.equal(value, final[1][key]) for key, value in final[0].items())


@pytest.mark.ray
@pytest.mark.parametrize("staleness,lags", [(0, [0.0, 0.0, 0.0]), (1, [0.0, 1.0, 1.0])])
def test_disaggregated_rollouts_lag_by_at_most_the_staleness(tiny_pipeline_dir, probe_run, tmp_path, staleness, lags,
                                                             ray_with_tests_importable):
    """max_staleness 1 overlaps the rollout of step i+1 with the update of step i: that rollout comes from the
    weights before update i, one update behind; 0 keeps every rollout on the current weights."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = main(["train", f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={prompts}",
                 f"eval.prompts={prompts}", "train.prompts_per_step=2", "generator.steps=2", "train.steps=3",
                 "train.log_every=1", "train.sample_every=0", "train.save_every=3", "runtime.backend=ray",
                 "runtime.placement=disaggregated", f"runtime.max_staleness={staleness}",
                 f"run.output_dir={tmp_path}", "run.name=stale", "algo.options={ttur: 1}"])
    assert code == 0
    records = read_metrics(tmp_path / "stale")
    assert [r["rollout/weights_lag"] for r in records] == lags
    assert all(math.isfinite(r["loss/dmd"]) for r in records)


# ----------------------------------------------------------------------------------- groups, shards, noise

def test_prompt_groups_shard_whole_and_micro_batches_never_split_a_group(tiny_config):
    source = PromptSource("world:train", seed=0)
    batch = source.groups(3, prompts_per_step=4, group_size=3)
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(len(set(batch.prompts[g * 3:(g + 1) * 3])) == 1 for g in range(4))
    assert batch.prompts == source.groups(3, 4, 3).prompts != source.groups(4, 4, 3).prompts  # (seed, step)
    shards = batch.shard(2)
    assert [s.group_ids.tolist() for s in shards] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    with pytest.raises(UsageError, match="split evenly"):
        batch.shard(3)

    method = build_method(tiny_config("sd3", "train.micro_batch_size=4"))
    rollout = rollout_batch(method, 0, PROMPTS[:3], group_size=2)
    assert rollout.micro_batches() == [slice(0, 4), slice(4, 6)]
    rollout.micro_batch_size = 3  # a size train.* validation would refuse for group_size 2
    with pytest.raises(UsageError, match="splits group 1"):
        rollout.micro_batches()
    assert isinstance(PromptBatch(["a"], np.zeros(1, dtype=np.int64), 1).shard(1)[0], PromptBatch)


def test_a_group_can_share_its_initial_noise(tiny_config):
    """DanceGRPO's init_same_noise: one initial noise per group, different across groups."""
    method = build_method(tiny_config("sd3"))
    shard = PromptBatch([p for p in PROMPTS[:2] for _ in range(3)], np.repeat(np.arange(2), 3), 3)
    for shared in (True, False):
        trajectory, _ = draw_rollout(method.roles["generator"], method.cfg,
                                     RolloutSpec(CPS(1.0), shared_noise_in_group=shared), 0, shard, 0, decode=False,
                                     weights_version=0)
        start = trajectory.states[:, 0]
        assert torch.equal(start[0], start[2]) == shared and torch.equal(start[3], start[5]) == shared
        assert not torch.equal(start[0], start[3])
