import json

import numpy as np
import pytest
import torch

from rlfew import checkpoint as checkpoint_module
from rlfew.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def make_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps):
    """Train on data drawn from the step number, as rlfew draws every random stream from (seed, step)."""
    for step in steps:
        loss = model(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def small_checkpoint(run_dir, step, value=1.0):
    return save_checkpoint(run_dir, step, {"generator": {"w": torch.full((3, 4), value)}}, {"step_seen": step})


def test_adamw_round_trip_continues_bit_identically(tmp_path):
    model, optimizer, scheduler = make_model_and_optimizer()
    train_steps(model, optimizer, scheduler, range(3))
    path = save_checkpoint(tmp_path, 3, {"generator": model.state_dict()},
                           {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "data": {"epoch": 1, "position": 17, "order": [3, 1, 2]}})
    assert path == tmp_path / "checkpoints" / "step_3"
    train_steps(model, optimizer, scheduler, range(3, 5))  # the uninterrupted run
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    checkpoint = load_checkpoint(path)
    resumed, resumed_optimizer, resumed_scheduler = make_model_and_optimizer(seed=123)
    resumed.load_state_dict(checkpoint.tensors["generator"])
    resumed_optimizer.load_state_dict(checkpoint.state["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint.state["scheduler"])
    train_steps(resumed, resumed_optimizer, resumed_scheduler, range(3, 5))

    assert checkpoint.step == 3
    assert checkpoint.state["data"] == {"epoch": 1, "position": 17, "order": [3, 1, 2]}
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_state_types_round_trip_exactly(tmp_path):
    state = {
        "int_keys": {0: "a", 7: {"nested": (1, 2.5, None)}},
        "tensor": torch.arange(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.0),
        "array": np.arange(4, dtype=np.int64),
        "np_number": np.float32(0.5),
        "tricky": {"__tensor__": "not a reference"},
        "floats": [float("inf"), 1e-300, -0.0],
    }
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, {}, state)).state
    assert loaded["int_keys"] == {0: "a", 7: {"nested": (1, 2.5, None)}}
    assert torch.equal(loaded["tensor"], state["tensor"]) and loaded["tensor"].dtype == torch.bfloat16
    assert torch.equal(loaded["scalar"], state["scalar"]) and loaded["scalar"].shape == ()
    assert isinstance(loaded["array"], np.ndarray) and (loaded["array"] == state["array"]).all()
    assert loaded["np_number"] == 0.5
    assert loaded["tricky"] == {"__tensor__": "not a reference"}
    assert loaded["floats"] == [float("inf"), 1e-300, -0.0]


def test_unsupported_state_value_is_rejected(tmp_path):
    with pytest.raises(TypeError, match=r"state\.bad: cannot store object"):
        save_checkpoint(tmp_path, 1, {}, {"bad": object()})
    assert list_checkpoints(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []  # temp dir removed


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(4, 4)
    path = save_checkpoint(tmp_path, 1, {"generator": {"embed": shared, "lm_head": shared}}, {})
    loaded = load_checkpoint(path).tensors["generator"]
    assert torch.equal(loaded["embed"], shared) and torch.equal(loaded["lm_head"], shared)


def test_manifest_lists_sha256_and_sizes(tmp_path):
    path = small_checkpoint(tmp_path, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 5 and manifest["tensor_groups"] == ["generator"]
    assert set(manifest["files"]) == {"generator.safetensors", "state.json", "state.safetensors"}  # no RNG state
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert len(entry["sha256"]) == 64


def test_truncated_file_names_the_file(tmp_path):
    path = small_checkpoint(tmp_path, 1)
    weights = path / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated or altered: \d+ bytes, expected \d+"):
        load_checkpoint(path)


def test_flipped_byte_names_the_file(tmp_path):
    path = small_checkpoint(tmp_path, 1)
    weights = path / "generator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{weights}: corrupted: sha256 does not match"):
        load_checkpoint(path)


def test_unverified_load_still_reports_broken_safetensors(tmp_path):
    path = small_checkpoint(tmp_path, 1)
    weights = path / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=rf"{weights}: cannot be read as safetensors"):
        load_checkpoint(path, verify=False)


def test_missing_file_and_missing_checkpoint(tmp_path):
    path = small_checkpoint(tmp_path, 1)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{path / 'state.json'}: missing from checkpoint"):
        load_checkpoint(path)
    missing = tmp_path / "checkpoints" / "step_99"
    with pytest.raises(CheckpointError, match=f"checkpoint '{missing}' does not exist"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match="no manifest.json; not an rlfew checkpoint"):
        load_checkpoint(tmp_path)


def test_truncated_manifest(tmp_path):
    path = small_checkpoint(tmp_path, 1)
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CheckpointError, match=rf"{manifest}: unreadable manifest"):
        load_checkpoint(path)


def test_failure_mid_write_leaves_no_step_dir(tmp_path, monkeypatch):
    previous = small_checkpoint(tmp_path, 1, value=1.0)
    real_save_file = checkpoint_module.safetensors.torch.save_file

    def save_then_die(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        if str(filename).endswith("state.safetensors"):
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.safetensors.torch, "save_file", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        small_checkpoint(tmp_path, 2, value=2.0)
    monkeypatch.undo()

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    assert latest_checkpoint(tmp_path) == previous
    assert torch.equal(load_checkpoint(previous).tensors["generator"]["w"], torch.full((3, 4), 1.0))


def test_rename_is_the_commit_point(tmp_path, monkeypatch):
    """A process killed before the rename leaves only a temp dir, which is ignored and later pruned."""
    previous = small_checkpoint(tmp_path, 1)

    def killed(src, dst):
        raise KeyboardInterrupt  # stands in for the process dying right before the rename

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        small_checkpoint(tmp_path, 2)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    assert latest_checkpoint(tmp_path) == previous

    leftover = tmp_path / "checkpoints" / ".tmp-step_3-abc"  # what SIGKILL would leave
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == previous
    assert leftover in prune_checkpoints(tmp_path, keep=5)
    assert not leftover.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    small_checkpoint(tmp_path, 4, value=1.0)
    path = small_checkpoint(tmp_path, 4, value=2.0)
    assert torch.equal(load_checkpoint(path).tensors["generator"]["w"], torch.full((3, 4), 2.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4"]


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 20, 100, 40):
        small_checkpoint(tmp_path, step)
    assert latest_checkpoint(tmp_path).name == "step_100"  # numeric, not lexicographic
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["step_20", "step_5"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [40, 100]
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)


def test_reserved_group_names_rejected(tmp_path):
    with pytest.raises(ValueError, match="tensor group name 'state'"):
        save_checkpoint(tmp_path, 1, {"state": {}}, {})
