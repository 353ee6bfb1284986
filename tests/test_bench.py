"""`rlfew bench` runtime and dmd on tiny pipelines: the JSON reports every mode with its timings (never asserted
against a number: speed targets live in the benchmarks, not in tests)."""

import json
from pathlib import Path

import pytest

from rlfew.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_dmd_bench_reports_float32_trainables_that_move_under_a_bfloat16_model(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "dmd.json"
    assert main(["bench", "dmd", "--shape", "tiny", "--steps", "2", "--lora-rank", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["trainable_dtypes"] == ["torch.float32"] and report["frozen_dtypes"] == ["torch.bfloat16"]
    assert report["generator_lora_tensors_moved"] == report["generator_lora_tensors"] > 0
    assert report["median_step_seconds"] > 0


@pytest.mark.ray
def test_runtime_bench_times_every_placement(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "runtime.json"
    assert main(["bench", "runtime", "--model", tiny_pipeline_dir("sd3"), "--student", "none", "--prompts",
                 str(prompts), "--steps", "2", "--prompts-per-step", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"inprocess", "ray_colocated", "ray_disaggregated_staleness0",
                            "ray_disaggregated_staleness1"}
    assert results["inprocess"]["step_time_ratio_vs_inprocess"] == 1.0
    assert all(r["median_step_seconds"] > 0 and r["startup_and_first_step_seconds"] > 0 for r in results.values())


@pytest.mark.parametrize("recipe", ["configs/world/grpo.yaml", "configs/world/tdm_r1.yaml"])
def test_grpo_bench_reports_images_per_second_and_efficiency(recipe, tmp_path):
    """The world GRPO and TDM-R1 recipes, in-process: the iteration and the model calls alone are timed, efficiency is
    their ratio (no number asserted: the target lives in the README's bench table)."""
    out = tmp_path / "grpo.json"
    assert main(["bench", "grpo", "--recipe", str(REPO / recipe), "--modes", "inprocess", "--steps", "1",
                 "--prompts-per-step", "2", "--group-size", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["model_calls_alone_seconds"]) == {"rollout", "reward", "update"}
    result = report["results"]["inprocess"]
    calls = sum(report["model_calls_alone_seconds"].values())
    assert result["efficiency"] == pytest.approx(calls / result["median_iteration_seconds"])
    assert result["images_per_second"] == pytest.approx(4 / result["median_iteration_seconds"])


def test_grpo_bench_refuses_an_unknown_mode(capsys):
    assert main(["bench", "grpo", "--modes", "inprocess,gpu-cluster"]) == 2
    assert "--modes: 'gpu-cluster'" in capsys.readouterr().err
