"""The reward contract, output validation, reward specs and name resolution.

A reward scores a batch of images against their prompts: `score(images, prompts, **meta) -> Tensor[B]`,
images float in [0,1] with shape (B,3,H,W). `load` resolves a name to a `Reward`, in this order:
built-in names, `module:attr` paths, the `rlfew.rewards` entry-point group; a plain callable object is
wrapped directly. Every loaded reward validates its output, so a broken reward fails loudly, naming itself
and the prompts, instead of training on silent zeros.
"""

from __future__ import annotations

import abc

import dataclasses
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlfew.config import RewardSpec, parse_reward_spec
from rlfew.errors import RewardError, UsageError

ENTRY_POINT_GROUP = "rlfew.rewards"


def describe_prompts(prompts: Sequence[str], limit: int = 8) -> str:
    """Prompts quoted for an error message, cut after `limit` so a batch of 512 stays readable."""
    shown = ", ".join(repr(p) for p in list(prompts)[:limit])
    hidden = len(prompts) - limit
    return f"[{shown}{f', ... and {hidden} more' if hidden > 0 else ''}]"


class Reward(abc.ABC):
    """Base class of all rewards. Subclasses set `name` and `differentiable` and implement `compute`.

    `score` (the public entry point) checks the inputs, calls `compute`, and validates its output:
    shape (B,), finite values. Any failure becomes a `RewardError` naming the reward and the prompts.
    """

    name: str = "reward"
    differentiable: bool = False
    # How this reward was loaded, so a worker process can rebuild it with `load(spec)`; None when it was
    # built from an object that has no importable name (a lambda, a closure).
    spec: RewardSpec | None = None

    @abc.abstractmethod
    def compute(self, images: torch.Tensor, prompts: list[str], **meta: Any) -> torch.Tensor | Sequence[float]:
        """Scores for a validated batch: Tensor[B] or B numbers."""

    def score(self, images: torch.Tensor, prompts: Sequence[str], **meta: Any) -> torch.Tensor:
        prompts = list(prompts)
        check_images(images, prompts, self.name)
        try:
            output = self.compute(images, prompts, **meta)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward {self.name!r} raised {type(err).__name__}: {err}; "
                              f"prompts: {describe_prompts(prompts)}") from err
        return validate_scores(output, prompts, self.name, device=images.device)

    __call__ = score

    def to(self, device: str | torch.device) -> "Reward":
        """Move the reward's networks (every torch module it holds) to `device`; returns self."""
        for name, value in vars(self).items():
            if isinstance(value, torch.nn.Module):
                setattr(self, name, value.to(device))
            elif isinstance(value, Reward):
                value.to(device)
        for part, _ in getattr(self, "parts", ()):  # a MultiReward's (reward, weight) pairs
            part.to(device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def check_images(images: Any, prompts: list[str], reward_name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {reward_name!r} expects images as a float tensor (B,3,H,W) in [0,1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"reward {reward_name!r} expects float images in [0,1], got dtype {images.dtype}")
    if images.shape[0] != len(prompts):
        raise ValueError(f"reward {reward_name!r} got {images.shape[0]} images but {len(prompts)} prompts")


def validate_scores(output: Any, prompts: list[str], reward_name: str,
                    device: torch.device | None = None) -> torch.Tensor:
    """Turn a reward's output into a float Tensor[B], or raise RewardError naming the reward and prompts."""
    batch = len(prompts)
    if isinstance(output, torch.Tensor):
        scores = output
    else:
        try:
            scores = torch.as_tensor([float(value) for value in output], dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward {reward_name!r} returned {type(output).__name__}, expected a Tensor[{batch}] "
                              f"or a list of {batch} numbers ({err}); prompts: {describe_prompts(prompts)}") from err
    if tuple(scores.shape) != (batch,):
        raise RewardError(f"reward {reward_name!r} returned shape {tuple(scores.shape)}, expected ({batch},); "
                          f"prompts: {describe_prompts(prompts)}")
    if not scores.is_floating_point():
        scores = scores.float()
    finite = torch.isfinite(scores.detach())
    if not bool(finite.all()):
        bad = [(prompts[i], float(scores[i])) for i in (~finite).nonzero().flatten().tolist()]
        raise RewardError(f"reward {reward_name!r} returned non-finite scores for {len(bad)} of {batch} images: "
                          + "; ".join(f"{prompt!r} -> {value}" for prompt, value in bad[:8]))
    return scores.to(device) if device is not None else scores


class CallableReward(Reward):
    """Wraps a function `f(images, prompts, **kw) -> list[float] | Tensor` (the shape of trl's reward
    functions). It counts as non-differentiable unless declared (`differentiable=True` here, or a
    `differentiable = True` attribute on the function)."""

    def __init__(self, function: Callable[..., Any], name: str | None = None, differentiable: bool | None = None,
                 **bound_options: Any):
        self.function = function
        self.name = name or getattr(function, "__name__", type(function).__name__)
        self.differentiable = bool(getattr(function, "differentiable", False) if differentiable is None
                                   else differentiable)
        self.bound_options = bound_options  # passed on every call, e.g. a threshold chosen in the spec

    def compute(self, images, prompts, **meta):
        return self.function(images, prompts, **self.bound_options, **meta)


# ------------------------------------------------------------------------------------------ discovery

@dataclasses.dataclass(frozen=True)
class BuiltinReward:
    target: str  # "module:attr" of the class or factory
    differentiable: bool
    summary: str


BUILTINS: dict[str, BuiltinReward] = {
    "pickscore": BuiltinReward("rlfew.rewards.clip_rewards:PickScore", True,
                               "PickScore v1: logit_scale * cos(image, prompt), CLIP-H/14"),
    "clipscore": BuiltinReward("rlfew.rewards.clip_rewards:ClipScore", True,
                               "CLIP score: 100 * max(cos(image, prompt), 0), CLIP-L/14"),
    "aesthetic": BuiltinReward("rlfew.rewards.clip_rewards:AestheticScore", True,
                               "LAION aesthetic predictor v2 (MLP on CLIP-L/14 image embeddings)"),
    "hpsv2": BuiltinReward("rlfew.rewards.hpsv2:HPSv2", True, "HPS v2.0: cosine, converted open_clip ViT-H-14"),
    "hpsv2.1": BuiltinReward("rlfew.rewards.hpsv2:HPSv21", True, "HPS v2.1: cosine, converted open_clip ViT-H-14"),
    "imagereward": BuiltinReward("rlfew.rewards.imagereward:ImageReward", True,
                                 "ImageReward v1.0 (BLIP + MLP), normalised"),
    "jpeg": BuiltinReward("rlfew.rewards.simple:JpegCompressibility", False,
                          "JPEG compressibility: -(JPEG size in kB), as in DDPO"),
    "ocr": BuiltinReward("rlfew.rewards.ocr:OcrReward", False,
                         "similarity of OCR-read text to the quoted text in the prompt (rapidocr)"),
    "world": BuiltinReward("rlfew.rewards.world:WorldEvaluatorReward", False,
                           "embedded world's exact evaluator (fraction of caption checks satisfied)"),
    "world-clip": BuiltinReward("rlfew.rewards.world:WorldClip", True,
                                "embedded world's CLIP, scored like PickScore"),
}


def import_target(path: str) -> Any:
    """Import `module:attr` (attr may be dotted, e.g. `pkg.mod:Class.factory`)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"reward path {path!r} must look like 'package.module:attribute'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"reward {path!r}: cannot import module {module_name!r} ({err})") from err
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return target


def reward_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _is_scoring_callable(function: Callable) -> bool:
    """A function taking (images, prompts, ...) scores; one taking only options is a factory."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _as_reward(obj: Any, name: str, options: dict[str, Any], depth: int = 0) -> Reward:
    """Turn what a name resolved to (class, factory, scoring callable, reward object) into a Reward."""
    if isinstance(obj, Reward):
        if options:
            raise UsageError(f"reward {name!r} is an already-built object; it takes no options, got {sorted(options)}")
        return obj
    if inspect.isclass(obj):
        try:
            instance = obj(**options)
        except TypeError as err:
            raise UsageError(f"reward {name!r}: cannot construct {obj.__qualname__} with options {options}: {err}") \
                from err
        return _as_reward(instance, name, {}, depth + 1)
    if hasattr(obj, "score") and callable(obj.score):  # duck-typed reward object from another library
        if options:
            raise UsageError(f"reward {name!r} is an already-built object; it takes no options, got {sorted(options)}")
        return CallableReward(obj.score, name, getattr(obj, "differentiable", False))
    if callable(obj):
        if _is_scoring_callable(obj):
            differentiable = options.pop("differentiable", None)
            return CallableReward(obj, name, differentiable, **options)
        if depth > 0:
            raise UsageError(f"reward {name!r}: factory returned {obj!r}, which is not a reward")
        return _as_reward(obj(**options), name, {}, depth + 1)
    raise UsageError(f"reward {name!r} resolved to {type(obj).__name__}, which is neither a Reward, a class, "
                     f"a factory nor a callable f(images, prompts, **kw)")


def _importable_name(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    try:
        return f"{module}:{qualname}" if import_target(f"{module}:{qualname}") is obj else None
    except UsageError:
        return None


def known_reward_names() -> list[str]:
    return sorted(BUILTINS) + sorted(reward_entry_points())


def load(name_or_spec: str | RewardSpec | Callable | Sequence, **options: Any) -> Reward:
    """Build a reward from a built-in name, a `module:attr` path, an entry-point name, a RewardSpec, or a
    plain callable `f(images, prompts, **kw)`. A spec naming several rewards, or a weight other than 1,
    returns a `MultiReward`. Keyword options go to the reward's constructor (or are bound to a callable)."""
    if isinstance(name_or_spec, Reward):
        return _as_reward(name_or_spec, name_or_spec.name, dict(options))
    if callable(name_or_spec):
        importable = _importable_name(name_or_spec)
        name = importable or getattr(name_or_spec, "__name__", type(name_or_spec).__name__)
        reward = _as_reward(name_or_spec, name, dict(options))
        reward.name = name
        reward.spec = RewardSpec(name, 1.0, options) if importable else None
        return reward
    specs = parse_reward_spec(name_or_spec)
    if len(specs) > 1 or specs[0].weight != 1.0:
        if options:
            raise UsageError(f"options {sorted(options)} are ambiguous for the multi-reward spec {name_or_spec!r}; "
                             f"give each reward its options in a {{name, weight, options}} entry")
        from rlfew.rewards.multi import MultiReward
        return MultiReward([(load_one(spec), spec.weight) for spec in specs])
    spec = specs[0]
    return load_one(RewardSpec(spec.name, 1.0, {**spec.options, **options}))


def load_one(spec: RewardSpec) -> Reward:
    """Resolve one spec (its weight is not applied here)."""
    name, options = spec.name, dict(spec.options)
    if name in BUILTINS:
        target = import_target(BUILTINS[name].target)
    elif ":" in name:
        target = import_target(name)
    else:
        entry_points = reward_entry_points()
        if name not in entry_points:
            raise UsageError(f"unknown reward {name!r}; built-in rewards: {', '.join(sorted(BUILTINS))}; "
                             f"entry points ({ENTRY_POINT_GROUP}): {', '.join(sorted(entry_points)) or 'none'}; "
                             f"or give a 'package.module:attribute' path")
        try:
            target = entry_points[name].load()
        except Exception as err:
            raise UsageError(f"reward entry point {name!r} ({entry_points[name].value}) failed to load: {err}") \
                from err
    reward = _as_reward(target, name, options)
    reward.name = name
    reward.spec = RewardSpec(name, 1.0, spec.options)
    return reward


@dataclasses.dataclass(frozen=True)
class RewardInfo:
    name: str
    source: str  # "builtin" or "entry point <module:attr>"
    differentiable: bool | None  # None: only known after construction (a factory)
    summary: str


def list_rewards() -> list[RewardInfo]:
    """Built-ins and installed entry points. Entry points are imported (not constructed) to read their
    `differentiable` attribute; one that fails to import is listed with the error as its summary."""
    infos = [RewardInfo(name, "builtin", builtin.differentiable, builtin.summary)
             for name, builtin in sorted(BUILTINS.items())]
    for name, entry_point in sorted(reward_entry_points().items()):
        try:
            target = entry_point.load()
        except Exception as err:
            infos.append(RewardInfo(name, f"entry point {entry_point.value}", None, f"fails to import: {err}"))
            continue
        if inspect.isclass(target) or isinstance(target, Reward) or _is_scoring_callable(target):
            differentiable = bool(getattr(target, "differentiable", False))
        else:
            differentiable = None
        summary = (inspect.getdoc(target) or "").split("\n")[0]
        infos.append(RewardInfo(name, f"entry point {entry_point.value}", differentiable, summary))
    return infos
