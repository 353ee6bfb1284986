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
