"""`rlfew bench` runtime and dmd on tiny pipelines: the JSON reports every mode with its timings (never asserted
against a number: speed targets live in the benchmarks, not in tests)."""

import json

import pytest

from rlfew.cli import main


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
