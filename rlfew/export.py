"""Export a trained generator back to diffusers: LoRA weights for `load_lora_weights`, or a merged pipeline
folder for `from_pretrained`."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlfew.errors import UsageError
from rlfew.models import Roles
from rlfew.models.loading import denoiser_component_name


def export_lora(roles: Roles, out: str | Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ adapter metadata so rank/alpha survive) into `out`."""
    from peft.utils import get_peft_model_state_dict

    generator = roles["generator"]
    if generator.lora is None:
        raise UsageError("the generator was fully fine-tuned (roles.generator.lora_rank=0): export it merged instead")
    pipeline = roles.adapter.pipeline
    component = denoiser_component_name(pipeline)
    layers = get_peft_model_state_dict(generator.net, adapter_name=generator.lora)
    metadata = generator.net.peft_config[generator.lora].to_dict()
    out = Path(out)
    type(pipeline).save_lora_weights(out, **{f"{component}_lora_layers": layers,
                                            f"{component}_lora_adapter_metadata": metadata})
    return out


def export_merged(roles: Roles, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A full diffusers folder whose denoiser is the generator (LoRA fused into a copy of the weights),
    optionally cast to `dtype` (e.g. float16 for a smaller folder)."""
    pipeline = roles.adapter.pipeline
    component = denoiser_component_name(pipeline)
    generator = roles["generator"]
    net = copy.deepcopy(generator.net)
    if generator.lora is not None:
        net.enable_adapters()
        net.set_adapters([generator.lora], weights=[generator.lora_scale])
        net.fuse_lora(adapter_names=[generator.lora])
        net.unload_lora()
    net.requires_grad_(False)
    components = dict(pipeline.components)
    components[component] = net
    merged = type(pipeline)(**components)
    if dtype is not None:
        merged = copy.deepcopy(merged).to(dtype=dtype)  # leave the live roles' shared modules untouched
    out = Path(out)
    merged.save_pretrained(out)
    return out
