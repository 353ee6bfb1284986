"""A local two-node Ray cluster (`ray start --head` + `ray start --address`) runs `rlfew train` submitted with
`ray job submit`; the job must succeed and leave its run directory."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(*args, env, timeout=180):
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    return subprocess.run([ray_cli, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_node_cluster(tmp_path):
    pytest.importorskip("ray.dashboard", reason="`ray job submit` needs ray[default] (the job server)")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": tempfile.mkdtemp(prefix="rlfew-ray-")}  # short: socket paths
    port, dashboard = _free_port(), _free_port()
    head = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", "--include-dashboard=true", "--disable-usage-stats", env=env)
    assert head.returncode == 0, head.stderr
    try:
        worker = _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"second_node": 1}',
                      env=env)
        assert worker.returncode == 0, worker.stderr
        yield env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        _ray("stop", "--force", env=env)


def test_ray_job_submit_trains_on_a_two_node_cluster(two_node_cluster, tiny_pipeline_dir, tmp_path):
    env, address, dashboard = two_node_cluster
    nodes = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}'); "
                            "print(sum(n['Alive'] for n in ray.nodes()))"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    job = _ray("job", "submit", f"--address={dashboard}", "--", sys.executable, "-m", "rlfew.cli", "train",
               f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={prompts}", f"eval.prompts={prompts}",
               "train.steps=3", "train.batch_size=2", "train.save_every=3", f"run.output_dir={tmp_path / 'runs'}",
               "run.name=job", "runtime.placement=disaggregated", env=env, timeout=420)
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-3000:] + job.stderr[-3000:]
    run_dir = tmp_path / "runs" / "job"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 3
    assert (run_dir / "checkpoints" / "step_3").is_dir()
