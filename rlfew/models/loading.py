"""Resolve a model source (hub id, local diffusers folder, or `world:*` asset) and load it with diffusers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rlfew.errors import ModelLoadError
from rlfew.models.base import FamilyAdapter
from rlfew.models.flow import FlowAdapter
from rlfew.models.flux import FluxAdapter
from rlfew.models.vp import VPAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """`auto`: CUDA when available, else the CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device: {device!r} requested but CUDA is not available")
    return device


def resolve_source(source: str) -> str:
    """A local folder path, or a hub id when no such folder exists and the hub may be reached."""
    if source.startswith("world:"):
        from rlfew.world import resolve_world_asset

        return str(resolve_world_asset(source))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"model path {source!r} exists but is not a diffusers pipeline folder "
                                 f"(no model_index.json)")
        return str(path)
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model path {source!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelLoadError(f"model {source!r} is not a local folder, and HF_HUB_OFFLINE is set so the hub "
                             f"cannot be used; pass a local diffusers folder or world:teacher")
    return source


def _absent_components(folder: str) -> dict[str, None]:
    """Components recorded as null in model_index.json (e.g. SD3 without T5) must be passed as None."""
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        return {}
    index = json.loads(index_path.read_text())
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value[0] is None}


def load_pipeline(source: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load any diffusers text-to-image pipeline (DiffusionPipeline dispatches on model_index.json)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    resolved = resolve_source(source)
    local = Path(resolved).exists()
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            resolved, dtype=dtype, local_files_only=local, **(_absent_components(resolved) if local else {}))
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"could not load model {source!r}: {err}") from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def make_adapter(pipeline, device: str | torch.device = "cpu") -> FamilyAdapter:
    """Pick the family adapter from the pipeline's denoiser."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    denoiser = denoiser_of(pipeline)
    if isinstance(denoiser, FluxTransformer2DModel):
        return FluxAdapter(pipeline, device)
    if isinstance(denoiser, SD3Transformer2DModel):
        return FlowAdapter(pipeline, device)
    if isinstance(denoiser, UNet2DConditionModel):
        return VPAdapter(pipeline, device)
    raise ModelLoadError(f"unsupported denoiser {type(denoiser).__name__}; supported: SD3Transformer2DModel "
                         f"(SD3/SD3.5), FluxTransformer2DModel (FLUX.1), UNet2DConditionModel "
                         f"(SD1.5, SD2.1/SD-Turbo, SDXL/SDXL-Turbo)")


def denoiser_of(pipeline) -> torch.nn.Module:
    for name in ("transformer", "unet"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return module
    raise ModelLoadError(f"{type(pipeline).__name__} has neither a transformer nor a unet")


def denoiser_component_name(pipeline) -> str:
    return "transformer" if getattr(pipeline, "transformer", None) is not None else "unet"


def load_denoiser(source: str, like: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Load only the denoiser of another pipeline folder (e.g. a distilled student beside its teacher)."""
    resolved = resolve_source(source)
    subfolder = "transformer" if (Path(resolved) / "transformer").is_dir() else "unet"
    try:
        return type(like).from_pretrained(resolved, subfolder=subfolder, dtype=dtype,
                                          local_files_only=Path(resolved).exists())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the denoiser of {source!r}: {err}") from err
