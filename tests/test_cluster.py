"""A local two-node Ray cluster (`ray start --head` + `ray start --address`) runs `rlfew train` submitted with
`ray job submit`; the job must succeed and leave its run directory.

The machine may run other Ray instances (a user's training job), and this test must never touch them: never Ray's
own stop command (it stops every Ray process on the machine), a private RAY_TMPDIR and explicit ports for each
instance it starts, and a teardown that signals only that instance's own processes. An independent bystander
instance proves it by surviving the cluster's teardown."""

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray

RAY_CLI = shutil.which("ray", path=str(Path(sys.executable).parent))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(*args, env, timeout=180):
    return subprocess.run([RAY_CLI, *args], check=False, env=env, capture_output=True, text=True, timeout=timeout)


def _http_ok(url: str) -> bool:
    # Bypass any proxy from the environment: the services listen on 127.0.0.1 only.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(processes) -> list[tuple[int, str]]:
    described = []
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            described.append((proc.pid, proc.name()))
    return sorted(described)


class _RayInstance:
    """The Ray processes this test started under one private RAY_TMPDIR, each `ray start --block` a session leader."""

    def __init__(self, log_dir: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="rlfew-ray-")  # short: Ray's unix socket paths live under it
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                    "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": self.temp_dir}
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True)
        self.launchers: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> None:
        """`ray start --block *args` in a new session, which the Ray processes it spawns inherit."""
        with open(self.log_dir / f"{name}.log", "w") as log:
            self.launchers.append(subprocess.Popen(
                [RAY_CLI, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def processes(self) -> set[psutil.Process]:
        """This instance's live processes, and no one else's.

        The daemons and workers stay in the session of the `ray start` that spawned them (workers get process groups
        of their own, so the launchers' process groups are not enough), and the daemons name the private temp dir on
        their command lines. A job's driver, and the watchdog Ray pairs it with, start new sessions, but they descend
        from the job's supervisor and inherit the private RAY_TMPDIR even once orphaned."""
        sessions = {launcher.pid for launcher in self.launchers}
        found = set()
        for proc in psutil.process_iter():
            # Other users' processes deny their environment; vanished ones raise too: neither is ours.
            with contextlib.suppress(psutil.Error, OSError):
                if (os.getsid(proc.pid) in sessions or self.temp_dir in " ".join(proc.cmdline())
                        or proc.environ().get("RAY_TMPDIR") == self.temp_dir):
                    found |= {proc, *proc.children(recursive=True)}
        return {proc for proc in found if _alive(proc)}

    def wait_until(self, condition, what: str, timeout: float = 120):
        """Poll `condition` until it returns something truthy, and return that; fail early if a launcher died."""
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            if any(launcher.poll() is not None for launcher in self.launchers) or time.monotonic() > deadline:
                logs = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(self.log_dir.iterdir()))
                pytest.fail(f"no {what} after {timeout} s, or a `ray start` exited:\n{logs}")
            time.sleep(0.5)
        return result

    def stop(self, grace_s: float = 5) -> None:
        """SIGTERM this instance's processes, then SIGKILL what outlives `grace_s` (gcs_server can hang on SIGTERM)."""
        doomed = self.processes()  # before anything dies: a process orphaned later is no longer a descendant
        for proc in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, lingering = psutil.wait_procs(doomed, timeout=grace_s)
        lingering = set(lingering) | self.processes()
        for proc in lingering:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(lingering, timeout=10)
        for launcher in self.launchers:
            launcher.wait(timeout=10)  # reap: this test's own children would otherwise linger as zombies
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def bystander_ray(tmp_path):
    """An independent single-node Ray, standing in for a user's job: the cluster's teardown must leave it running."""
    pytest.importorskip("ray.dashboard", reason="`ray job submit` needs ray[default] (the job server)")
    bystander = _RayInstance(tmp_path / "bystander-logs")
    try:
        # Cheap (no dashboard, no CPUs so no prestarted workers), yet a real GCS, raylet and agents.
        bystander.start("head", "--head", f"--port={_free_port()}", "--num-cpus=0", "--include-dashboard=false",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}")
        yield bystander
    finally:
        bystander.stop()
    assert not bystander.processes(), _describe(bystander.processes())


def test_ray_job_submit_trains_on_a_two_node_cluster(bystander_ray, tiny_pipeline_dir, tmp_path):
    cluster = _RayInstance(tmp_path / "cluster-logs")
    try:
        # Every port explicit: Ray's fixed defaults (agent 52365, client server 10001, dashboard 8265) clash between
        # the cluster's two nodes and with any other Ray on the machine, and a head agent that cannot bind its port
        # leaves the job server without an agent to submit to.
        port, dashboard_port, agent_port = _free_port(), _free_port(), _free_port()
        cluster.start("head", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                      f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={_free_port()}")
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        # The dashboard hands a submitted job to the head node's agent and gives up ("No available agent to submit
        # job") unless that agent is up within 10 s, which a busy machine can miss right after `ray start`.
        cluster.wait_until(lambda: _http_ok(f"{dashboard}/api/version")
                           and _http_ok(f"http://127.0.0.1:{agent_port}/api/healthz"), "job server")
        cluster.start("worker", f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"second_node": 1}',
                      f"--dashboard-agent-listen-port={_free_port()}")
        # `ray start --block` does not say when the worker node has joined: poll for it.
        count_nodes = textwrap.dedent(f"""
            import time, ray
            ray.init(address="127.0.0.1:{port}")
            deadline = time.monotonic() + 90
            while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            print(len(nodes), sum(n["Resources"].get("second_node", 0) for n in nodes))""")
        nodes = subprocess.run([sys.executable, "-c", count_nodes], check=False, env=cluster.env, capture_output=True,
                               text=True, timeout=180)
        assert nodes.stdout.strip().splitlines()[-1:] == ["2 1.0"], nodes.stdout + nodes.stderr

        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red circle\ntwo blue squares\n")
        job = _ray("job", "submit", f"--address={dashboard}", "--", sys.executable, "-m", "rlfew.cli", "train",
                   f"model.source={tiny_pipeline_dir('sd3')}", f"train.prompts={prompts}", f"eval.prompts={prompts}",
                   "train.steps=3", "train.prompts_per_step=2", "train.save_every=3",
                   f"run.output_dir={tmp_path / 'runs'}", "run.name=job", "runtime.placement=disaggregated",
                   env=cluster.env, timeout=420)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-3000:] + job.stderr[-3000:]
        run_dir = tmp_path / "runs" / "job"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records and records[-1]["step"] == 3
        assert (run_dir / "checkpoints" / "step_3").is_dir()

        def bystander_daemons():
            processes = bystander_ray.processes()
            return processes if {"gcs_server", "raylet"} <= {name for _, name in _describe(processes)} else None

        bystander_processes = bystander_ray.wait_until(bystander_daemons, "bystander GCS and raylet")
    finally:
        cluster.stop()
    assert not cluster.processes(), _describe(cluster.processes())
    assert not Path(cluster.temp_dir).exists()
    assert all(_alive(proc) for proc in bystander_processes), _describe(bystander_processes)
