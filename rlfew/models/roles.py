"""Role-named networks built from a table of `RoleSpec`s: the single place that decides which roles share a
network, which weights train (always in float32) and which stay frozen (in `model.dtype` or the role's dtype).

A method declares the roles it needs (generator, teacher, critic, reference, surrogate, EMA copies, ...) as
`{name: RoleSpec}`; a recipe overrides fields under `roles:`. Two networks can be loaded: the **teacher**
(`teacher.source`, else `model.source`) and the **student** (`generator.source`, else `model.source`; the same
object as the teacher when both sources are one folder). Each role starts from one of them:

  * `lora_rank > 0`: a peft LoRA adapter named after the role, on that network (shared: no second copy), or on a
    private copy with `own_network`;
  * `lora_rank == 0`, frozen: the network itself, run with every adapter off (the teacher; a reference that is
    the generator before training);
  * `lora_rank == 0`, trainable: a full float32 copy of the network (the network itself when no other role uses
    it, so a full fine-tune of a separate student holds one copy, not two);
  * `ema_of: X`: a frozen float32 copy of X's trainable weights (a second adapter of X's rank on X's network, or a
    copy of X's network), moved by `Roles.update_ema` after X's optimiser steps.

Every call selects the role's adapter and scale and restores the previous selection afterwards, so a network
never keeps a role's adapter switched on between calls: a direct `net(...)` call is the base network.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rlfew.errors import ConfigError, UsageError
from rlfew.models.base import Conditioning, FamilyAdapter, Prediction
from rlfew.models.loading import DTYPES, denoiser_of, load_denoiser, load_pipeline, make_adapter, resolve_source

# Attention projections of both families (diffusers names); extend with `lora_targets`.
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
NETWORKS = ("teacher", "student")


@dataclass
class RoleSpec:
    """One role of a method: where its network comes from, its adapter, whether it trains, and its optimiser.

    Optimiser fields left at None take the `train.*` value of the same name.
    """

    init: str = "teacher"  # "teacher" or "student": the network this role starts from
    lora_rank: int = 0  # > 0: a LoRA adapter on that network; 0: the network itself (frozen) or a full copy
    lora_alpha: float | None = None  # None: equal to lora_rank (scale 1)
    lora_scale: float = 1.0  # the adapter's scale when this role runs
    lora_targets: list[str] | None = None  # None: the attention projections (DEFAULT_LORA_TARGETS)
    own_network: bool = False  # a LoRA role on a private copy of the network instead of sharing it
    trainable: bool = False
    dtype: str | None = None  # frozen weights of the network this role runs on; None: model.dtype
    ema_of: str | None = None  # a frozen float32 copy of that role's trainable weights, moved by update_ema
    ema_decay: float = 0.999  # θ_ema ← d·θ_ema + (1 − d)·θ
    lr: float | None = None
    betas: list[float] | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None  # linear warm-up over this role's own optimiser steps
    grad_clip: float | None = None  # max gradient norm; 0 turns clipping off

    def check(self, name: str, roles: Mapping[str, "RoleSpec"]) -> None:
        """Errors name `roles.<name>.<field>` and what is allowed."""
        key = f"roles.{name}"
        if not self.lora_scale > 0:
            raise ConfigError(f"{key}.lora_scale: must be > 0, got {self.lora_scale}")
        if self.ema_of is not None:
            copied = sorted(f.name for f in dataclasses.fields(self) if f.name not in ("ema_of", "ema_decay")
                            and getattr(self, f.name) != f.default)
            if copied:
                raise ConfigError(f"{key}.{copied[0]}: an EMA copy takes everything from its role "
                                  f"({self.ema_of!r}); set only ema_of and ema_decay")
            if self.ema_of not in roles or self.ema_of == name:
                raise ConfigError(f"{key}.ema_of: {self.ema_of!r} is not another role; roles: {', '.join(roles)}")
            if self.trainable or not roles[self.ema_of].trainable:
                raise ConfigError(f"{key}.ema_of: an EMA copy is frozen and follows a trainable role "
                                  f"({self.ema_of!r} is {'trainable' if roles[self.ema_of].trainable else 'frozen'})")
            if not 0.0 <= self.ema_decay < 1.0:
                raise ConfigError(f"{key}.ema_decay: must be in [0, 1), got {self.ema_decay}")
            return
        if self.ema_decay != RoleSpec.ema_decay:
            raise ConfigError(f"{key}.ema_decay: only an EMA copy (ema_of) has a decay")
        if self.init not in NETWORKS:
            raise ConfigError(f"{key}.init: {self.init!r} is not allowed; choose one of {', '.join(NETWORKS)}")
        if self.lora_rank < 0:
            raise ConfigError(f"{key}.lora_rank: must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"{key}.lora_alpha: must be > 0, got {self.lora_alpha}")
        if self.own_network and self.lora_rank == 0:
            raise ConfigError(f"{key}.own_network: only a LoRA role (lora_rank > 0) shares or copies a network")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"{key}.dtype: {self.dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
        if self.trainable and self.dtype not in (None, "float32"):
            raise ConfigError(f"{key}.dtype: trainable weights stay float32 (frozen ones may be {self.dtype}); "
                              f"set model.dtype for the frozen base weights instead")
        for option in ("lr", "weight_decay", "grad_clip", "warmup_steps"):
            value = getattr(self, option)
            if value is not None and not value >= 0:
                raise ConfigError(f"{key}.{option}: must be >= 0, got {value}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas)):
            raise ConfigError(f"{key}.betas: expected [beta1, beta2] in [0, 1), got {self.betas}")


class _AdapterSelector:
    """Which LoRA adapter (and scale) a shared network runs with. Switches through peft's tuner layers directly:
    diffusers' `set_adapters` walks every module and toggles requires_grad (≈1 ms per switch on the 3M-parameter
    world transformer, more on real models); this touches only the LoRA layers and never requires_grad."""

    def __init__(self, net: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [module for module in net.modules() if isinstance(module, BaseTunerLayer)]
        self.current: tuple[str | None, float] = (None, 1.0)
        for layer in self.layers:
            layer.enable_adapters(False)

    def select(self, lora: str | None, scale: float) -> tuple[str | None, float]:
        """Run with `lora` at `scale` (None: no adapter); returns the previous selection."""
        previous = self.current
        if (lora, scale) == previous:
            return previous
        for layer in self.layers:
            if lora is None:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = [lora]
                layer.set_scale(lora, scale)
        self.current = (lora, scale)
        return previous


class Role:
    """One named network: `predict` runs it through the family adapter with this role's adapter and scale."""

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
        with self.selected(lora_scale):
            return self.adapter.predict(self.net, x, sigma, cond, guidance, uncond)

    @contextlib.contextmanager
    def selected(self, lora_scale: float | None = None) -> Iterator[nn.Module]:
        """The network with this role's adapter selected (`lora_scale` overrides the role's scale), restored to the
        previous selection on exit."""
        selector = getattr(self.net, "_rlfew_selector", None)
        if selector is None:
            if self.lora is not None:
                raise UsageError(f"role {self.name!r}: network has no LoRA adapter {self.lora!r}")
            yield self.net
            return
        previous = selector.select(self.lora, self.lora_scale if lora_scale is None else lora_scale)
        try:
            yield self.net
        finally:
            selector.select(*previous)

    def _own_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This role's weights: its LoRA adapter's, or the whole network's."""
        if self.lora is None:
            return list(self.net.named_parameters())
        return [(n, p) for n, p in self.net.named_parameters() if f".{self.lora}." in n]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._own_parameters()] if self.trainable else []

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores for this role: its LoRA weights, or the full network (parameters and buffers)."""
        if self.lora is None:
            return {k: v.detach() for k, v in self.net.state_dict().items()}
        return {n: p.detach() for n, p in self._own_parameters()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora is None:
            self.net.load_state_dict(state)
            return
        params = dict(self._own_parameters())
        unknown, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        if unknown or missing:
            raise UsageError(f"LoRA state for role {self.name!r} does not match the network "
                             f"(unknown: {unknown[:3]}, missing: {missing[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


class Roles(Mapping[str, Role]):
    """The roles of a run, by name, with the family adapter they share and the specs they were built from."""

    def __init__(self, adapter: FamilyAdapter, roles: dict[str, Role], specs: dict[str, RoleSpec]):
        self.adapter = adapter
        self._roles = roles
        self.specs = specs

    def __getitem__(self, name: str) -> Role:
        if name not in self._roles:
            raise UsageError(f"role {name!r} was not built; roles: {', '.join(self._roles)}")
        return self._roles[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)

    def trainable(self) -> list[str]:
        return [name for name, role in self._roles.items() if role.trainable]

    def ema_roles(self, of: str | None = None) -> list[str]:
        return [name for name, spec in self.specs.items() if spec.ema_of is not None and of in (None, spec.ema_of)]

    def sharing(self) -> list[list[str]]:
        """Roles grouped by the network object they run on (one group per network)."""
        groups: dict[int, list[str]] = {}
        for name, role in self._roles.items():
            groups.setdefault(id(role.net), []).append(name)
        return list(groups.values())

    @torch.no_grad()
    def update_ema(self, name: str, decay: float | None = None) -> None:
        """θ_ema ← d·θ_ema + (1 − d)·θ for the EMA role `name` (d: its spec's ema_decay unless given)."""
        spec = self.specs[name]
        decay = spec.ema_decay if decay is None else decay
        ema, source = self._roles[name], self._roles[spec.ema_of]
        for ema_value, value in zip(_paired_values(ema), _paired_values(source)):
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)


def _paired_values(role: Role) -> list[torch.Tensor]:
    """A role's weights in a fixed order that lines up with its EMA copy's (LoRA params, or the full state)."""
    if role.lora is None:
        return list(role.net.state_dict().values())
    return [p for _, p in role._own_parameters()]


# ------------------------------------------------------------------------------------------------ build

def add_lora(net: nn.Module, name: str, rank: int, alpha: float | None = None,
             targets: list[str] | None = None) -> list[nn.Parameter]:
    """Attach a peft LoRA adapter in float32 (B zero-initialised, so the output is unchanged at creation) and
    return its parameters. The base weights are untouched."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=targets or DEFAULT_LORA_TARGETS, init_lora_weights="gaussian")
    with warnings.catch_warnings():  # several roles' adapters on one network is the point, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        net.add_adapter(config, adapter_name=name)
    added = [param for param_name, param in net.named_parameters() if f".{name}." in param_name]
    for param in added:
        param.data = param.data.float()
    net._rlfew_selector = _AdapterSelector(net)  # rebuilt: the new adapter may add tuner layers
    return added


def build_roles(model_source: str, specs: Mapping[str, RoleSpec], *, teacher_source: str | None = None,
                student_source: str | None = None, dtype: str = "float32", device: str | torch.device = "cpu",
                standalone: tuple[str, ...] = ("generator",)) -> Roles:
    """Build every role of `specs` (see the module docstring) over one pipeline.

    model_source: the pipeline (text encoders, VAE, scheduler) and, unless overridden, both networks;
    teacher_source / student_source: folders whose denoiser is the teacher / the student network (their text
    encoders and VAE must match the pipeline's). Trainable weights are float32; frozen weights (the text encoders,
    the VAE, base weights under adapters) take `dtype`, or a role's own dtype, once every adapter is attached.
    standalone: roles that are also built alone elsewhere, so their network's frozen dtype must not depend on the
    other roles.
    """
    specs = dict(specs)
    for name, spec in specs.items():
        spec.check(name, specs)
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    # Everything is built and cast on the CPU, then moved once: a network loaded in float32 and cast on the device
    # would briefly need both copies there.
    pipeline = load_pipeline(model_source, dtype=torch.float32, device="cpu")
    adapter = make_adapter(pipeline, device)
    frozen_parts = [module for module in pipeline.components.values() if isinstance(module, nn.Module)]
    for module in frozen_parts:  # text encoders and the VAE are frozen and shared by every role
        module.requires_grad_(False)

    base_roles = {name: spec for name, spec in specs.items() if spec.ema_of is None}
    networks = _load_networks(adapter, pipeline, {spec.init for spec in base_roles.values()}, model_source,
                              teacher_source, student_source)
    users: dict[int, list[str]] = {}  # network id -> roles running on it (teacher and student may be one object)
    for name, spec in base_roles.items():
        if not spec.own_network:
            users.setdefault(id(networks[spec.init]), []).append(name)
    # Networks first, copies taken before any adapter is attached (a copy must not carry another role's LoRA).
    nets: dict[str, nn.Module] = {}
    for name, spec in base_roles.items():
        shared = networks[spec.init]
        if spec.lora_rank == 0 and spec.trainable:
            # A full fine-tune trains the network in place when nothing else runs on it, else a float32 copy.
            nets[name] = shared if users[id(shared)] == [name] else copy.deepcopy(shared)
        else:
            nets[name] = copy.deepcopy(shared) if spec.own_network else shared
    built: dict[str, Role] = {}
    for name, spec in base_roles.items():
        net = nets[name]
        if spec.lora_rank > 0:
            add_lora(net, name, spec.lora_rank, spec.lora_alpha, spec.lora_targets)
            built[name] = Role(name, adapter, net, lora=name, lora_scale=spec.lora_scale, trainable=spec.trainable)
        else:
            built[name] = Role(name, adapter, net.requires_grad_(spec.trainable), trainable=spec.trainable)
    for name, spec in specs.items():
        if spec.ema_of is not None:
            built[name] = _ema_copy(name, built[spec.ema_of], specs[spec.ema_of])
    # peft re-marks adapters' requires_grad whenever another adapter is added: settle every LoRA role's once here.
    for role in built.values():
        if role.lora is not None:
            for _, param in role._own_parameters():
                param.requires_grad_(role.trainable)

    # A network's frozen base takes the dtype its roles set (they must agree), else model.dtype. A role that is also
    # built on its own (the generator, on rollout workers and for export) must get the same base both ways.
    base_dtypes: dict[int, tuple[str, str]] = {}  # network id -> (dtype of its frozen base weights, set by role)
    for name, spec in base_roles.items():
        if spec.dtype is not None and not (spec.trainable and spec.lora_rank == 0):
            earlier = base_dtypes.setdefault(id(nets[name]), (spec.dtype, name))
            if earlier[0] != spec.dtype:
                raise ConfigError(f"roles.{name}.dtype: {spec.dtype} conflicts with {earlier[0]} of role "
                                  f"{earlier[1]!r}, which runs on the same network")
    for name in standalone:
        spec = base_roles.get(name)
        if spec is None or (spec.trainable and spec.lora_rank == 0):
            continue
        own, (shared, setter) = spec.dtype or dtype, base_dtypes.get(id(nets[name]), (spec.dtype or dtype, name))
        if shared != own:
            raise ConfigError(f"roles.{setter}.dtype: {shared} would also be the frozen base of role {name!r}, "
                              f"which is built on its own elsewhere (rollout workers, export) in {own}; set "
                              f"model.dtype instead, or give {name!r} a network of its own (a separate "
                              f"generator.source, or own_network)")
    # Full fine-tunes and full EMA copies stay float32; everything else is a frozen base under its dtype.
    float32_networks = {id(role.net) for role in built.values() if role.lora is None and (
        role.trainable or specs[role.name].ema_of is not None)}
    denoisers = {id(role.net): role.net for role in built.values()}
    for net in denoisers.values():
        if id(net) not in float32_networks:
            _cast_frozen_base(net, DTYPES[base_dtypes.get(id(net), (dtype,))[0]])
    for module in frozen_parts:
        if all(module is not net for net in denoisers.values()):
            module.to(DTYPES[dtype])
    pipeline.to(device)
    for net in denoisers.values():
        net.to(device)
    return Roles(adapter, built, specs)


def _load_networks(adapter: FamilyAdapter, pipeline, wanted: set[str], model_source: str, teacher_source: str | None,
                   student_source: str | None) -> dict[str, nn.Module]:
    """The teacher and student denoisers (float32, prepared for the adapter); one object when their sources
    resolve to the same folder."""
    pipeline_net = adapter.prepare_network(denoiser_of(pipeline))
    resolved_model = resolve_source(model_source)
    sources = {"teacher": teacher_source or model_source, "student": student_source or model_source}
    loaded: dict[str, nn.Module] = {}
    networks = {}
    for network in NETWORKS:
        if network not in wanted:
            continue
        resolved = resolve_source(sources[network])
        if resolved == resolved_model:
            networks[network] = pipeline_net
        elif resolved in loaded:
            networks[network] = loaded[resolved]
        else:
            loaded[resolved] = adapter.prepare_network(load_denoiser(sources[network], pipeline_net, torch.float32))
            networks[network] = loaded[resolved]
    return networks


def _ema_copy(name: str, source: Role, source_spec: RoleSpec) -> Role:
    """A frozen float32 copy of `source`'s trainable weights: a second adapter on its network, or a network copy."""
    if source.lora is not None:
        params = add_lora(source.net, name, source_spec.lora_rank, source_spec.lora_alpha, source_spec.lora_targets)
        with torch.no_grad():
            for target, value in zip(params, [p for _, p in source._own_parameters()]):
                target.copy_(value)
        return Role(name, source.adapter, source.net, lora=name, lora_scale=source.lora_scale)
    net = copy.deepcopy(source.net).requires_grad_(False)
    return Role(name, source.adapter, net)


def _cast_frozen_base(net: nn.Module, dtype: torch.dtype) -> None:
    """Cast a network's base weights to `dtype`, keeping every LoRA adapter (trainable or EMA) in float32."""
    if dtype == torch.float32:
        return
    for param_name, param in net.named_parameters():
        if ".lora_" not in param_name and param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in net.modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[buffer_name] = buffer.to(dtype)


def frozen_and_trainable_dtypes(roles: Roles) -> dict[str, set[torch.dtype]]:
    """{"trainable": dtypes of every trainable parameter, "frozen": of every frozen weight (denoisers, text encoders,
    VAE)}: the mixed-precision rule says trainable weights are float32 whatever model.dtype is."""
    trainable = {p.dtype for name in roles.trainable() for p in roles[name].trainable_parameters()}
    modules = [role.net for role in roles.values()] + [
        module for module in roles.adapter.pipeline.components.values() if isinstance(module, nn.Module)]
    frozen = {p.dtype for module in modules for p in module.parameters() if not p.requires_grad}
    return {"trainable": trainable, "frozen": frozen}


def merge_role_specs(declared: Mapping[str, RoleSpec], overrides: Mapping[str, Mapping] | None,
                     method: str) -> dict[str, RoleSpec]:
    """A method's role table with a recipe's `roles:` overrides applied and validated.

    A recipe may change any field of a declared role except `trainable` and `ema_of` (the method's algorithm
    decides what it trains), and may add EMA copies of trainable roles (`{ema_of: generator}`)."""
    from rlfew.config import config_from_dict

    merged = {name: dataclasses.replace(spec) for name, spec in declared.items()}
    for name, fields in (overrides or {}).items():
        key = f"roles.{name}"
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{key}: expected a mapping of role fields, got {fields!r}")
        if name in declared:
            fixed = sorted(f for f in ("trainable", "ema_of") if f in fields and fields[f] != getattr(declared[name], f))
            if fixed:
                raise ConfigError(f"{key}.{fixed[0]}: set by the method {method!r} and not overridable")
            merged[name] = config_from_dict(RoleSpec, {**dataclasses.asdict(declared[name]), **fields}, prefix=key)
        else:
            if fields.get("ema_of") is None:
                raise ConfigError(f"{key}: method {method!r} has no role {name!r} (roles: {', '.join(declared)}); "
                                  f"a recipe may only add EMA copies, e.g. roles.{name}: {{ema_of: generator}}")
            merged[name] = config_from_dict(RoleSpec, dict(fields), prefix=key)
    for name, spec in merged.items():
        spec.check(name, merged)
    return merged


