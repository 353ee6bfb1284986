"""Shared fixtures: pinned threads (2-core machines), offline hub, tiny pipelines of every family."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """`tiny_pipeline_dir(family)` -> folder with a saved tiny random pipeline (built once per session)."""
    from rlfew.testing import save_tiny_pipeline

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return str(cache[family])

    return get


@pytest.fixture
def tiny_config(tiny_pipeline_dir, tmp_path):
    """`tiny_config(family, *overrides)` -> a validated TrainConfig on a tiny pipeline: 2 generator steps, lr 1e-3
    for every trainable role, runs under the test's tmp_path. Overrides are `key=value`, as on the command line."""
    from rlfew.config import load_config

    def make(family: str = "sd3", *overrides: str):
        return load_config(None, [f"model.source={tiny_pipeline_dir(family)}", "generator.steps=2", "train.lr=1e-3",
                                  f"run.output_dir={tmp_path / 'runs'}", *overrides])

    return make


@pytest.fixture(scope="module")
def ray_with_tests_importable():
    """A local Ray whose workers can import the test modules (methods and rewards travel by `module:attr` paths)."""
    from pathlib import Path

    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent)}})
    yield ray
    ray.shutdown()
