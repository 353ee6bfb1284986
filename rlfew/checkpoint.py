"""Checkpoints as safetensors + JSON (no pickle): `<run>/checkpoints/step_N/`.

A checkpoint directory holds one `<group>.safetensors` per tensor group (one per trainable role, EMA copy or
trainable module: generator, critic, ...), `state.json` with the rest of the training state (optimiser state
dicts and step counters) whose tensors live in `state.safetensors`, and `manifest.json` (step, sha256 and size
of every file). It is written to a temporary sibling directory and renamed into place, so `step_N` is either
complete or absent. No RNG state is stored: every random stream of a run is derived from (seed, step), so a
resumed run redraws exactly what an uninterrupted one would (rlfew/runtime/seeds.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from rlfew.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "rlfew-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
_RESERVED_FILES = {MANIFEST, STATE_JSON, STATE_TENSORS}
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp-"

# Markers for what JSON cannot express directly; a dict that uses one of them as a key is itself
# written as a list of pairs, so decoding is unambiguous.
_TENSOR, _NDARRAY, _TUPLE, _PAIRS = "__tensor__", "__ndarray__", "__tuple__", "__pairs__"
_MARKERS = {_TENSOR, _NDARRAY, _TUPLE, _PAIRS}


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ------------------------------------------------------------------------------------- state <-> JSON

def _encode_state(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of `value`; tensors are moved to `tensors` and replaced by a reference."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach()
        return {_TENSOR: name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        return {_NDARRAY: name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [_encode_state(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_state(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and key not in _MARKERS for key in value):
            return {key: _encode_state(item, tensors, f"{where}.{key}") for key, item in value.items()}
        # Optimiser state is keyed by int parameter ids; keep the keys' types exactly.
        return {_PAIRS: [[_encode_state(key, tensors, f"{where} key"), _encode_state(item, tensors, f"{where}[{key!r}]")]
                         for key, item in value.items()]}
    raise TypeError(f"checkpoint state at {where}: cannot store {type(value).__name__} "
                    "(allowed: tensors, arrays, numbers, strings, None, lists, tuples, dicts)")


def _decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode_state(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, payload), = value.items()
        if marker == _TENSOR:
            return tensors[payload]
        if marker == _NDARRAY:
            return tensors[payload].numpy()
        if marker == _TUPLE:
            return tuple(_decode_state(item, tensors) for item in payload)
        if marker == _PAIRS:
            return {_decode_state(key, tensors): _decode_state(item, tensors) for key, item in payload}
    return {key: _decode_state(item, tensors) for key, item in value.items()}


# ------------------------------------------------------------------------------------------------ save

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses shared storage, e.g. tied weights)."""
    seen_storages = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(storage)
        result[name] = tensor
    return result


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1))


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any] | None = None) -> Path:
    """Write `<run_dir>/checkpoints/step_<step>/` atomically and return its path.

    `tensors` maps a group name (e.g. "generator", "critic") to a state dict; `state` is everything else
    (optimiser state dicts, counters): JSON values plus tensors anywhere inside.
    """
    for group in tensors:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", group) or f"{group}.safetensors" in _RESERVED_FILES:
            raise ValueError(f"tensor group name {group!r} must be a plain word other than 'state'")
    parent = checkpoints_dir(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step_{step}"
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}step_{step}-", dir=parent))
    try:
        for group, state_dict in tensors.items():
            safetensors.torch.save_file(_storable(state_dict), temp / f"{group}.safetensors")
        state_tensors: dict[str, torch.Tensor] = {}
        _write_json(temp / STATE_JSON, _encode_state(state or {}, state_tensors, "state"))
        safetensors.torch.save_file(_storable(state_tensors), temp / STATE_TENSORS)
        files = {}
        for path in sorted(temp.iterdir()):
            _fsync(path)
            files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "tensor_groups": list(tensors),
                    "files": files}
        _write_json(temp / MANIFEST, manifest)
        _fsync(temp / MANIFEST)
        _fsync(temp)
        _move_into_place(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync(parent)
    return final


def _move_into_place(temp: Path, final: Path) -> None:
    """Rename `temp` to `final`; an existing `final` (same step saved again) is swapped out, then removed."""
    if not final.exists():
        os.replace(temp, final)
        return
    displaced = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}-old-", dir=final.parent))
    os.replace(final, displaced / final.name)
    os.replace(temp, final)
    shutil.rmtree(displaced, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load

@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; not an rlfew checkpoint directory "
                              "(expected <run>/checkpoints/step_N)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest (truncated or corrupted): {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: not an rlfew checkpoint manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: checkpoint format version {manifest.get('version')} is not "
                              f"supported (this rlfew reads version {FORMAT_VERSION})")
    return manifest


def _verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from checkpoint")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: truncated or altered: {size} bytes, expected {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: corrupted: sha256 does not match the manifest")


def _load_tensors(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(file, device=str(device))
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{file}: cannot be read as safetensors: {err}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Read a `step_N` directory; with `verify`, every file's size and sha256 are checked first."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    manifest = _read_manifest(path)
    if verify:
        _verify_files(path, manifest)
    tensors = {group: _load_tensors(path / f"{group}.safetensors", device) for group in manifest["tensor_groups"]}
    state_tensors = _load_tensors(path / STATE_TENSORS, "cpu")
    state_file = path / STATE_JSON
    try:
        state = _decode_state(json.loads(state_file.read_text()), state_tensors)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
        raise CheckpointError(f"{state_file}: unreadable training state: {err}") from None
    return Checkpoint(path=path, step=int(manifest["step"]), tensors=tensors, state=state)


# ------------------------------------------------------------------------------------- find and prune

def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a manifest is the last thing written) as (step, path), oldest first."""
    parent = checkpoints_dir(run_dir)
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, and temp dirs left by killed saves; return what was deleted.

    Call it from the process that saves, after a save: a temp dir is only ever in flight inside save_checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    doomed = [path for _, path in list_checkpoints(run_dir)[:-keep]]
    parent = checkpoints_dir(run_dir)
    if parent.is_dir():
        doomed += [entry for entry in parent.iterdir() if entry.name.startswith(_TEMP_PREFIX)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
