"""Finding and reading reward checkpoints: a local file, a local folder, or a file in a hub repository."""

from __future__ import annotations

from pathlib import Path

import torch

from rlfew.errors import ModelLoadError, UsageError


def resolve_file(source: str | Path, filename: str, required: bool = True) -> Path | None:
    """`source` is a file (returned as is), a folder holding `filename`, or a hub repository id.

    Hub downloads go through huggingface_hub's cache, so HF_HUB_OFFLINE=1 works once files are cached.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        if required:
            raise ModelLoadError(f"{filename!r} not found in folder {str(path)!r}")
        return None
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ModelLoadError(f"{str(source)!r} is neither an existing file or folder nor a hub id 'owner/name'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(source), filename))
    except EntryNotFoundError:
        if required:
            raise ModelLoadError(f"hub repository {source!r} has no file {filename!r}") from None
        return None
    except Exception as err:  # offline, missing repo, no cache: say which file could not be had
        raise ModelLoadError(f"cannot fetch {filename!r} from hub repository {source!r}: {err}") from err


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a `.pt`/`.pth`/`.bin` (tensors only, `weights_only=True`) or `.safetensors` state dict; a
    `{'state_dict': ...}` wrapper and a DistributedDataParallel `module.` prefix are removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds {type(state).__name__}, not a state dict")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise UsageError(f"reward dtype {dtype!r} is not one of {sorted(allowed)}")
    return allowed[dtype]
