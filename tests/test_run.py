import json
import logging
import time

import pytest
import torch

from rlfew.config import load_config
from rlfew.errors import UsageError
from rlfew.run import MetricsLogger, RunDir


def read_metrics(run):
    return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def event_files(run):
    return list(run.path.glob("events.out.tfevents.*"))


def test_create_writes_resolved_config(tmp_path):
    cfg = load_config(None, ["train.steps=7"])
    run = RunDir.create(tmp_path / "runs", "demo", cfg)
    assert run.path == tmp_path / "runs" / "demo"
    assert (run.path / "samples").is_dir() and run.checkpoints_dir.is_dir()
    saved = load_config(run.config_path)
    assert saved.train.steps == 7
    assert saved.run.name == "demo" and saved.run.output_dir == str(tmp_path / "runs")


def test_refuses_to_reuse_a_non_empty_run_dir(tmp_path):
    cfg = load_config(None)
    RunDir.create(tmp_path, "demo", cfg)
    with pytest.raises(UsageError, match="already exists and is not empty.*run.resume=auto"):
        RunDir.create(tmp_path, "demo", cfg)
    assert RunDir.create(tmp_path, "demo", cfg, resume=True).path == tmp_path / "demo"
    (tmp_path / "empty").mkdir()
    RunDir.create(tmp_path, "empty", cfg)  # an empty directory is fine


def test_metrics_jsonl_and_tensorboard(tmp_path, caplog):
    run = RunDir.create(tmp_path, "demo", load_config(None))
    with run.metrics_logger() as logger:
        logger.log(1, {"loss": 0.5, "reward": torch.tensor(2.0), "count": 3})
        with caplog.at_level(logging.WARNING, logger="rlfew.run"):
            logger.log(2, {"loss": float("nan"), "grad_norm": float("inf"), "reward": 1.0})
        grid = logger.log_samples(2, torch.rand(2, 3, 8, 8), ["a red circle", "two blue squares"])
    assert read_metrics(run) == [
        {"step": 1, "loss": 0.5, "reward": 2.0, "count": 3.0},
        {"step": 2, "loss": None, "grad_norm": None, "reward": 1.0},
    ]
    assert "non-finite metrics logged as null: loss=nan, grad_norm=inf" in caplog.text
    assert grid == run.path / "samples" / "step_2.png" and grid.stat().st_size > 0
    events = event_files(run)
    assert len(events) == 1 and events[0].stat().st_size > 0
    with pytest.raises(TypeError, match="metric 'name' must be a number"):
        with run.metrics_logger(resumed_step=2) as logger:
            logger.log(3, {"name": "x"})


def test_tensorboard_events_hold_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir.create(tmp_path, "demo", load_config(None))
    with run.metrics_logger() as logger:
        logger.log(1, {"loss": 0.25})
        logger.log_samples(1, torch.rand(1, 3, 4, 4), ["x"])
    events = EventAccumulator(str(run.path)).Reload()
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 0.25)]
    assert "samples" in events.Tags()["images"]


def test_resume_truncates_metrics_after_the_checkpoint_step(tmp_path):
    cfg = load_config(None)
    run = RunDir.create(tmp_path, "demo", cfg)
    with run.metrics_logger() as logger:
        for step in range(1, 8):
            logger.log(step, {"loss": float(step)})
    with open(run.path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "lo')  # the line a SIGKILL cut short
    # TensorBoard reads event files in name order: creation second, host, pid, then a per-process counter that
    # sorts wrongly past 9 (".10" < ".9"). A real resume is a later process; in one test process, let a second pass
    # so the resumed writer's file sorts after the first one's.
    time.sleep(1.1)

    resumed = RunDir.create(tmp_path, "demo", cfg, resume=True)
    with resumed.metrics_logger(resumed_step=4) as logger:
        logger.log(5, {"loss": 50.0})
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed)] == expected

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(resumed.path)).Reload()  # TensorBoard hides the interrupted run's later points
    assert [(s.step, s.value) for s in events.Scalars("loss")] == expected


def test_fresh_logger_discards_earlier_records(tmp_path):
    run = RunDir.create(tmp_path, "demo", load_config(None))
    with run.metrics_logger() as logger:
        logger.log(1, {"loss": 1.0})
    with run.metrics_logger(fresh=True) as logger:
        logger.log(1, {"loss": 2.0})
    assert read_metrics(run) == [{"step": 1, "loss": 2.0}]


def test_resume_checkpoint_resolution(tmp_path):
    run = RunDir.create(tmp_path, "demo", load_config(None))
    assert run.resume_checkpoint(None) is None
    assert run.resume_checkpoint("auto") is None  # nothing saved yet: start fresh
    first = run.save_checkpoint(10, {"generator": {"w": torch.zeros(2)}}, {})
    second = run.save_checkpoint(20, {"generator": {"w": torch.ones(2)}}, {}, keep=1)
    assert not first.exists()
    assert run.resume_checkpoint("auto") == second
    assert run.resume_checkpoint(str(second)) == second
    assert run.resume_checkpoint(str(run.path)) == second  # a run directory means its newest checkpoint
    with pytest.raises(UsageError, match="neither a checkpoint directory nor a run directory"):
        run.resume_checkpoint(str(tmp_path / "elsewhere"))


def test_logger_can_be_used_without_a_run_dir_object(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"x": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "x": 1.0}\n'
