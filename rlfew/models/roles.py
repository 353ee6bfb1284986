"""Role-named networks (generator, teacher, critic, reference) built once from one model source.

Networks are shared where the math allows: a LoRA generator sits on the teacher's own network (the teacher
is that network with adapters off; the reference is the generator with its LoRA off), and a LoRA critic is
one more adapter on the same network (DMDR's dynamic distribution guidance needs exactly that). Each call
switches the active adapter and its scale, so no second copy of a large model is held.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from rlfew.errors import UsageError
from rlfew.models.base import Conditioning, FamilyAdapter, Prediction
from rlfew.models.loading import DTYPES, denoiser_of, load_denoiser, load_pipeline, make_adapter

# Attention projections of both families (diffusers names); extend with `lora_targets`.
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class Role:
    """One named network: `predict` runs it through the family adapter with this role's adapter settings."""

    def __init__(self, name: str, adapter: FamilyAdapter, net: nn.Module, lora: str | None = None,
                 lora_scale: float = 1.0, trainable: bool = False):
        self.name = name
        self.adapter = adapter
        self.net = net
        self.lora = lora
        self.lora_scale = lora_scale
        self.trainable = trainable

    def predict(self, x: torch.Tensor, sigma, cond: Conditioning, guidance: float = 1.0,
                uncond: Conditioning | None = None, lora_scale: float | None = None) -> Prediction:
        with self.active(lora_scale):
            return self.adapter.predict(self.net, x, sigma, cond, guidance, uncond)

    @contextlib.contextmanager
    def active(self, lora_scale: float | None = None):
        """Configure the shared network's adapters for this role (`lora_scale` overrides the role's scale)."""
        _activate_adapter(self.net, self.lora, self.lora_scale if lora_scale is None else lora_scale)
        yield self.net

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.trainable:
            return []
        if self.lora is None:
            return [p for p in self.net.parameters() if p.requires_grad]
        return [p for n, p in self.net.named_parameters() if f".{self.lora}." in n]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores for this role: its LoRA weights, or the full network."""
        if self.lora is None:
            return {k: v.detach() for k, v in self.net.state_dict().items()}
        return {n: p.detach() for n, p in self.net.named_parameters() if f".{self.lora}." in n}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora is None:
            self.net.load_state_dict(state)
            return
        params = dict(self.net.named_parameters())
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(n for n in params if f".{self.lora}." in n) - set(state))
        if unknown or missing:
            raise UsageError(f"LoRA state for role {self.name!r} does not match the network "
                             f"(unknown: {unknown[:3]}, missing: {missing[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def _activate_adapter(net: nn.Module, lora: str | None, scale: float) -> None:
    if not getattr(net, "_hf_peft_config_loaded", False):
        if lora is not None:
            raise UsageError(f"network has no LoRA adapter {lora!r}")
        return
    state = (lora, scale)
    if getattr(net, "_rlfew_adapter_state", None) == state:  # switching walks every module: skip if unchanged
        return
    if lora is None:
        net.disable_adapters()
    else:
        net.enable_adapters()
        net.set_adapters([lora], weights=[scale])
    # peft marks inactive adapters requires_grad=False; a LoRA used earlier in the same autograd graph would
    # then silently get no gradient (autograd drops grads of leaves frozen after use). Inactive adapters add
    # nothing to the output, so keeping every trainable LoRA parameter requires_grad=True is exact.
    for param in getattr(net, "_rlfew_lora_parameters", ()):
        param.requires_grad_(True)
    net._rlfew_adapter_state = state


def add_lora(net: nn.Module, name: str, rank: int, alpha: float | None = None,
             targets: list[str] | None = None) -> None:
    """Attach a peft LoRA (B zero-initialised, so the network's output is unchanged at creation)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=targets or DEFAULT_LORA_TARGETS, init_lora_weights="gaussian")
    net.add_adapter(config, adapter_name=name)
    net._rlfew_adapter_state = None
    added = [param for param_name, param in net.named_parameters() if f".{name}." in param_name]
    net._rlfew_lora_parameters = [*getattr(net, "_rlfew_lora_parameters", ()), *added]
    for param in added:
        param.requires_grad_(True)


@dataclass
class ModelRoles:
    adapter: FamilyAdapter
    teacher: Role
    generator: Role | None = None
    critic: Role | None = None
    reference: Role | None = None

    def __getitem__(self, name: str) -> Role:
        role = getattr(self, name, None)
        if not isinstance(role, Role):
            raise UsageError(f"role {name!r} was not built")
        return role


def build_roles(source: str, *, generator_source: str | None = None, generator_lora_rank: int = 0,
                lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                critic: str | None = None, critic_lora_rank: int = 32, critic_lora_alpha: float | None = None,
                critic_lora_scale: float = 1.0,
                reference: bool = False, dtype: str = "float32", teacher_dtype: str | None = None,
                device: str | torch.device = "cpu") -> ModelRoles:
    """Build the roles a method asks for from one teacher source.

    critic: None, "full" (a trainable copy of the teacher, as in DMD2) or "lora" (an adapter on the teacher,
    as in DMDR). generator_source: a different folder whose denoiser initialises the generator (e.g. the
    distilled student); its text encoders and VAE must match the teacher's.
    """
    if critic not in (None, "full", "lora"):
        raise UsageError(f"critic must be one of None, 'full', 'lora'; got {critic!r}")
    for value in (dtype, teacher_dtype or dtype):
        if value not in DTYPES:
            raise UsageError(f"unknown dtype {value!r}; allowed: {', '.join(DTYPES)}")
    pipeline = load_pipeline(source, dtype=torch.float32, device=device)
    adapter = make_adapter(pipeline, device)
    # Text encoders and the VAE are frozen and shared by every role.
    for module in pipeline.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    teacher_net = adapter.prepare_network(denoiser_of(pipeline))
    roles = ModelRoles(adapter=adapter, teacher=Role("teacher", adapter, teacher_net))

    if critic == "full":
        critic_net = _cast(copy.deepcopy(teacher_net), DTYPES[dtype]).requires_grad_(True)
        roles.critic = Role("critic", adapter, critic_net, trainable=True)

    separate_generator = generator_source is not None and generator_source != source
    if separate_generator:
        generator_net = adapter.prepare_network(load_denoiser(generator_source, teacher_net, DTYPES[dtype]).to(device))
    elif generator_lora_rank > 0:
        generator_net = teacher_net  # the LoRA sits on the teacher; the teacher runs with adapters off
    else:
        generator_net = copy.deepcopy(teacher_net)
    _cast(generator_net, DTYPES[dtype])
    if generator_lora_rank > 0:
        generator_net.requires_grad_(False)
        add_lora(generator_net, "generator", generator_lora_rank, lora_alpha, lora_targets)
        roles.generator = Role("generator", adapter, generator_net, lora="generator", trainable=True)
        if reference:
            roles.reference = Role("reference", adapter, generator_net)
    else:
        generator_net.requires_grad_(True)
        roles.generator = Role("generator", adapter, generator_net, trainable=True)
        if reference:
            roles.reference = Role("reference", adapter, copy.deepcopy(generator_net).requires_grad_(False))

    if critic == "lora":
        add_lora(teacher_net, "critic", critic_lora_rank, critic_lora_alpha, lora_targets)
        roles.critic = Role("critic", adapter, teacher_net, lora="critic", lora_scale=critic_lora_scale,
                            trainable=True)
    if teacher_net is not generator_net or generator_lora_rank == 0:
        _cast(teacher_net, DTYPES[teacher_dtype or dtype])
    return roles


def _cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    return net if net.dtype == dtype else net.to(dtype)
