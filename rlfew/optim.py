"""One optimiser object per trainable role: AdamW with the role's lr, betas and weight decay, linear warm-up over
the role's own steps, gradient clipping, one bucketed all-reduce across learners, and gradient accumulation over
micro-batches (every `backward` adds to the gradients until `step`).

    opt = RoleOptimizer("critic", roles["critic"].trainable_parameters(), OptimizerSettings(lr=1e-4))
    for micro_batch in batch.micro_batches():
        backward(loss(micro_batch) * share, opt)
    grad_norm, applied = opt.step()       # all-reduce, clip, warm-up lr, AdamW; skipped if the norm is not finite
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BUCKET_BYTES = 64 * 2**20  # gradients are all-reduced in flat buffers of up to this size


@dataclass
class OptimizerSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping


class RoleOptimizer:
    """AdamW over one role's trainable parameters (float32), with its own step counter.

    `after_step` callbacks run after every applied step (EMA copies of the role follow it there).
    """

    def __init__(self, name: str, params: Sequence[torch.nn.Parameter], settings: OptimizerSettings,
                 after_step: Sequence[Callable[[], None]] = ()):
        if not params:
            raise ValueError(f"role {name!r} has no trainable parameters")
        wrong = {p.dtype for p in params if p.dtype != torch.float32}
        if wrong:
            raise ValueError(f"role {name!r}: trainable parameters must be float32, got {sorted(map(str, wrong))}")
        self.name = name
        self.params = list(params)
        self.settings = settings
        self.after_step = list(after_step)
        self.steps = 0  # optimiser steps applied (warm-up counts these)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, betas=tuple(settings.betas),
                                           weight_decay=settings.weight_decay)

    def step(self) -> tuple[float, bool]:
        """Average gradients over learners, clip, and step unless the pre-clip norm is non-finite; zero the grads.
        Returns (pre-clip gradient norm, whether the step was applied). Every learner sees the same averaged
        gradients, so all of them take the same branch."""
        all_reduce_mean(self.params)
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        applied = math.isfinite(grad_norm)
        if applied:
            warmup = self.settings.warmup_steps
            lr = self.settings.lr * (min(1.0, (self.steps + 1) / warmup) if warmup > 0 else 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.steps += 1
            for callback in self.after_step:
                callback()
        self.zero_grad()
        return grad_norm, applied

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Moments and step count from `state`; the hyperparameters stay this run's settings (torch's
        load_state_dict would bring back the saved betas and weight decay)."""
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update(betas=tuple(self.settings.betas), weight_decay=self.settings.weight_decay)
        self.steps = int(state["steps"])


def backward(loss: torch.Tensor, *optimizers: RoleOptimizer) -> None:
    """Accumulate d loss / d params into these roles' gradients only (never into another role that the loss
    also runs through, e.g. the critic under a GAN term, or a frozen reward model)."""
    loss.backward(inputs=[p for optimizer in optimizers for p in optimizer.params])


def all_reduce_mean(params: Sequence[torch.nn.Parameter]) -> None:
    """Average gradients across the learners' torch.distributed group in flat buckets (no-op with one learner).
    A parameter without a gradient contributes zeros, so every rank joins every collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        if not buckets or size + nbytes > BUCKET_BYTES or (grad.dtype, grad.device) != (buckets[-1][0].dtype,
                                                                                          buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += nbytes
    return buckets
