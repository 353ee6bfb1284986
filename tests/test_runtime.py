"""`rlfew train` end to end on a tiny SD3-family pipeline: run outputs, checkpoint retention, resume after SIGKILL,
bad input, non-finite losses (in-process), and on Ray: placements agree (also with two learners, whose shards draw
different noise), dead actors are restarted, two learners stay in sync."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlfew.cli import main
from rlfew.config import load_config

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a purple square"]


@pytest.fixture(scope="module")
def recipe(tiny_pipeline_dir, tmp_path_factory):
    """Overrides for a few-second DMD run on the tiny pipeline."""
    folder = tmp_path_factory.mktemp("recipe")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={prompts}", f"eval.prompts={prompts}",
            "train.prompts_per_step=2", "train.log_every=1", "train.sample_every=4", "train.save_every=2",
            "roles.generator.lora_rank=4", "roles.critic.lora_rank=0", "algo.options={ttur: 2}"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("loss/dmd"), r["loss/critic"]) for r in records]


def test_inprocess_run_writes_a_complete_run_directory(recipe, tmp_path):
    code = main(["train", *recipe, "train.steps=4", "runtime.backend=inprocess", f"run.output_dir={tmp_path}",
                 "run.name=demo"])
    run_dir = tmp_path / "demo"
    assert code == 0
    assert load_config(run_dir / "config.yaml").train.steps == 4
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss/critic"] > 0 for r in records) and [r["updated/generator"] for r in records] == [1, 0, 1, 0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_0.png", "step_4.png"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    # The run directory is not reused by accident.
    assert main(["train", *recipe, "train.steps=4", "runtime.backend=inprocess", f"run.output_dir={tmp_path}",
                 "run.name=demo"]) == 2


def test_a_bfloat16_lora_run_at_lr_1e_6_moves_every_lora_tensor(recipe, tmp_path):
    """H1 through `rlfew train`: with model.dtype=bfloat16 the LoRA weights train in float32, so three generator
    updates at lr 1e-6 change every LoRA tensor (A too, once B has left zero). In bf16, the old layout, a step of
    1e-6 on a weight of ~0.1 (ulp 4.9e-4) rounds away."""
    from rlfew.checkpoint import load_checkpoint
    from rlfew.method import build_method

    overrides = [*recipe, "model.dtype=bfloat16", "train.lr=1e-6", "roles.critic.lora_rank=4",
                 "algo.options={ttur: 1}", "train.steps=3", "train.save_every=3", "train.sample_every=0",
                 "runtime.backend=inprocess", f"run.output_dir={tmp_path}", "run.name=bf16"]
    assert main(["train", *overrides]) == 0
    cfg = load_config(tmp_path / "bf16" / "config.yaml")
    initial = build_method(cfg).roles["generator"].trainable_state_dict()  # the run's seed: its initial LoRA
    trained = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "step_3").tensors["generator"]
    assert all(value.dtype == torch.float32 for value in trained.values())
    unchanged = [name for name, value in trained.items() if torch.equal(value, initial[name])]
    assert not unchanged, unchanged


def test_keep_checkpoints_prunes_the_oldest(recipe, tmp_path):
    assert main(["train", *recipe, "train.steps=6", "train.save_every=1", "train.keep_checkpoints=2",
                 "train.sample_every=0", "runtime.backend=inprocess", f"run.output_dir={tmp_path}",
                 "run.name=kept"]) == 0
    assert sorted(p.name for p in (tmp_path / "kept" / "checkpoints").iterdir()) == ["step_5", "step_6"]


def test_resume_after_sigkill_continues_with_the_same_metrics(recipe, tmp_path):
    common = [*recipe, "runtime.backend=inprocess", f"run.output_dir={tmp_path}", "train.sample_every=0"]
    assert main(["train", *common, "train.steps=8", "run.name=straight"]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "rlfew.cli", "train", *common, "train.steps=60",
                               "run.name=killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step_4"
    deadline = time.time() + 240
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists(), "the killed run never wrote step_4"

    assert main(["train", *common, "train.steps=8", "run.name=killed", "run.resume=auto"]) == 0
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert _losses(resumed) == _losses(straight)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(recipe, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen([sys.executable, "-m", "rlfew.cli", "train", *recipe, "runtime.backend=inprocess",
                            f"run.output_dir={tmp_path}", "run.name=interrupted", "train.steps=100000",
                            "train.save_every=100000", "train.sample_every=0"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    saved = list((tmp_path / "interrupted" / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) >= 3
    assert "saving a checkpoint" in stderr


def test_bad_config_exits_2_and_writes_nothing(recipe, tmp_path, capsys):
    base = ["train", *recipe, "runtime.backend=inprocess", f"run.output_dir={tmp_path}"]
    cases = {
        "train.stpes=3": "train.stpes",
        "train.steps=abc": "train.steps",
        "model.dtype=float8": "float32",
        "generator.sampler=cps": "generator.sampler' has moved",
        "algo.name=nope": "nope",
        "model.source=/does/not/exist": "/does/not/exist",
        "algo.options={ttur: -1}": "ttur",
        "train.batch_size=4": "train.prompts_per_step",
        "roles.critic.lora_rnk=4": "roles.critic",
        "roles.surrogate.lora_rank=4": "no role 'surrogate'",
        "train.prompts_per_step=0": "train.prompts_per_step",
        "runtime.max_staleness=1": "runtime.placement=disaggregated",
    }
    for override, named in cases.items():
        assert main([*base, override]) == 2, override
        assert named in capsys.readouterr().err, override
    assert not any(tmp_path.iterdir())


def test_micro_batches_that_would_split_a_group_are_refused(recipe, tmp_path, capsys):
    assert main(["train", *recipe, "train.group_size=2", "train.micro_batch_size=3", "runtime.backend=inprocess",
                 f"run.output_dir={tmp_path}"]) == 2
    assert "train.micro_batch_size" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_non_finite_losses_skip_steps_then_abort_keeping_the_last_good_checkpoint(recipe, tmp_path, monkeypatch):
    from rlfew.algos.dmd import DMD

    original = DMD.train_step

    def poisoned(self, batch):
        if batch.step >= 2:  # from the third iteration on, the generator's samples are NaN
            batch.trajectory.states = torch.full_like(batch.trajectory.states, float("nan"))
            batch.trajectory.x0_preds = torch.full_like(batch.trajectory.x0_preds, float("nan"))
        return original(self, batch)

    monkeypatch.setattr(DMD, "train_step", poisoned)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        main(["train", *recipe, "runtime.backend=inprocess", f"run.output_dir={tmp_path}", "run.name=nan",
              "train.steps=20", "train.max_nonfinite_steps=3", "train.sample_every=0"])
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["step_2"]


# ------------------------------------------------------------------------------------------------ Ray

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _trainer(recipe, tmp_path, *overrides):
    from rlfew.config import load_config
    from rlfew.runtime.driver import Trainer

    cfg = load_config(None, [*recipe, f"run.output_dir={tmp_path}", "train.sample_every=0", *overrides])
    return Trainer(cfg)


def _training_metrics(records: list[dict]) -> list[dict]:
    """Everything a run computed (not how long it took)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.mark.ray
def test_ray_placements_match_the_inprocess_run_and_survive_dead_actors(recipe, tmp_path, ray_local):
    """Colocated and disaggregated Ray runs compute what the in-process run computes, metric for metric; killing
    the rollout worker and the reward worker mid-run restarts them and re-runs their batch without changing it, and
    a rollout worker Ray has already restarted between two steps is re-synced before it rolls out (it refuses to
    roll out with other weights than the driver expects)."""
    reference = _trainer(recipe, tmp_path, "runtime.backend=inprocess", "run.name=ref", "train.steps=4",
                         "reward=jpeg")
    assert reference.run() == 0

    colocated = _trainer(recipe, tmp_path, "runtime.backend=ray", "run.name=colo", "train.steps=4", "reward=jpeg")
    assert colocated.run() == 0

    faulty = _trainer(recipe, tmp_path, "runtime.backend=ray", "runtime.placement=disaggregated",
                      "run.name=faulty", "train.steps=4", "reward=jpeg")
    original_iteration = faulty.iteration

    def restarted(handle) -> None:
        """Wait until Ray has brought the killed actor back (empty: no generator weights yet)."""
        for _ in range(120):
            try:
                ray_local.get(handle.__ray_ready__.remote(), timeout=10)
                return
            except Exception:  # noqa: BLE001 - unavailable while restarting
                time.sleep(0.5)
        raise AssertionError("the rollout worker was not restarted")

    def iteration_with_faults(step):
        if step == 2:  # mid-run: the weight sync to the rollout worker may still be in flight
            ray_local.kill(faulty.rollout_workers[0].handle, no_restart=False)
            ray_local.kill(faulty.reward_workers["jpeg"].handle, no_restart=False)
        result = original_iteration(step)
        if step == 2:  # between steps, back up before the next rollout: it must not roll out with its empty weights
            ray_local.kill(faulty.rollout_workers[0].handle, no_restart=False)
            restarted(faulty.rollout_workers[0].handle)
        return result

    faulty.iteration = iteration_with_faults
    assert faulty.run() == 0

    expected = _training_metrics(_metrics(tmp_path / "ref"))
    assert {"loss/dmd", "loss/critic", "reward/jpeg", "grad_norm/critic"} <= set(expected[0])
    for name in ("colo", "faulty"):
        got = _training_metrics(_metrics(tmp_path / name))
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        for a, b in zip(got, expected):
            assert a.keys() == b.keys(), name
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (name, key)


@pytest.mark.ray
def test_two_learners_colocated_and_disaggregated_draw_the_same_distinct_shards(recipe, tmp_path, ray_local):
    """H2: every shard is seeded by (step, shard), so two learners rolling out their own shards and two rollout
    workers fanned out over the same shards compute the same run; the old disaggregated path gave both shards the
    same noise (and ran them one after the other on one worker)."""
    common = ["runtime.backend=ray", "runtime.num_learners=2", "train.prompts_per_step=4", "train.steps=3"]
    assert _trainer(recipe, tmp_path, *common, "run.name=colo2").run() == 0
    assert _trainer(recipe, tmp_path, *common, "run.name=disagg2", "runtime.placement=disaggregated",
                    "runtime.num_rollout_workers=2").run() == 0
    colocated, disaggregated = (_training_metrics(_metrics(tmp_path / n)) for n in ("colo2", "disagg2"))
    for a, b in zip(colocated, disaggregated):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.ray
def test_two_learners_average_gradients_over_gloo(recipe, tmp_path, ray_local):
    trainer = _trainer(recipe, tmp_path, "runtime.backend=ray", "runtime.num_learners=2", "run.name=ddp",
                       "train.steps=3")
    states = []
    release_actors = trainer.shutdown

    def read_weights_then_shutdown():
        states.extend(ray_local.get([learner.call("generator_state") for learner in trainer.learners]))
        release_actors()

    trainer.shutdown = read_weights_then_shutdown
    assert trainer.run() == 0
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=0, rtol=0)
    assert any(float(v.abs().sum()) > 0 for k, v in states[0].items() if "lora_B" in k), "the LoRA never moved"
    # each learner's metrics reach the log: the critic loss is the mean of two shards' losses
    assert all(r["loss/critic"] > 0 for r in _metrics(tmp_path / "ddp"))


@pytest.mark.ray
def test_a_reward_with_its_own_dependencies_scores_in_its_isolated_worker(recipe, tmp_path, ray_local):
    """The reward module and the package it needs exist only in the reward worker's runtime_env."""
    isolated = tmp_path / "modules"
    (isolated / "probe_dependency").mkdir(parents=True)
    (isolated / "probe_dependency" / "__init__.py").write_text('__version__ = "2.0"\n')
    (isolated / "probe_rewards").mkdir()
    (isolated / "probe_rewards" / "__init__.py").write_text(
        "import probe_dependency\n\n"
        "def dependency_major_version(images, prompts, **kwargs):\n"
        "    return [float(probe_dependency.__version__.split('.')[0])] * len(prompts)\n")
    with pytest.raises(ImportError):
        import probe_dependency  # noqa: F401 - the main environment must not have it
    # A worker-level runtime_env can carry pip / conda / env_vars; here its PYTHONPATH holds the modules.
    reward = (f"reward=[{{name: 'probe_rewards:dependency_major_version', "
              f"runtime_env: {{env_vars: {{PYTHONPATH: '{isolated}'}}}}}}]")
    trainer = _trainer(recipe, tmp_path, "runtime.backend=ray", "run.name=isolated", "train.steps=2", reward)
    assert trainer.run() == 0
    records = _metrics(tmp_path / "isolated")
    assert [r["reward/probe_rewards:dependency_major_version"] for r in records] == [2.0, 2.0]


def test_export_and_eval_read_a_runs_checkpoint(recipe, tmp_path):
    """The checkpoint, its merged export and the base pipeline with its exported LoRA are one generator: `rlfew eval`
    of each gives the same report."""
    assert main(["train", *recipe, "train.steps=2", "runtime.backend=inprocess", f"run.output_dir={tmp_path}",
                 "run.name=exportable", "train.sample_every=0"]) == 0
    run_dir = tmp_path / "exportable"
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    base = load_config(run_dir / "config.yaml").model.source
    evaluate = ["--steps", "2", "--max-prompts", "2", "--images-per-prompt", "2"]
    reports = {}
    for name, source in {"checkpoint": ["--checkpoint", str(run_dir / "checkpoints" / "step_2")],
                         "merged": ["--model", str(exported / "merged")],
                         "lora": ["--model", base, "--lora", str(exported / "lora")]}.items():
        assert main(["eval", *source, *evaluate, "--out", str(tmp_path / f"{name}.json")]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["checkpoint"]["n_images"] == 4
    for name in ("merged", "lora"):
        for key in ("accuracy", "fd", "diversity", "clip_score"):
            assert reports[name][key] == pytest.approx(reports["checkpoint"][key], rel=1e-4, abs=1e-6), (name, key)
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
