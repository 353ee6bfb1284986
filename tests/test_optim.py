"""RoleOptimizer (rlfew/optim.py): warm-up over the role's own steps, clipping, skipped non-finite steps, gradient
accumulation, float32-only parameters, state round trip, EMA callbacks, and one bucketed all-reduce per role
across two real gloo processes (M7: the old code issued one all-reduce per parameter)."""

import copy
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rlfew import optim
from rlfew.optim import OptimizerSettings, RoleOptimizer, backward


def quadratic(params, target: float = 1.0) -> torch.Tensor:
    return sum(((p - target) ** 2).sum() for p in params)


def test_linear_warmup_counts_the_roles_own_steps_and_skips_do_not_count():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = RoleOptimizer("g", [param], OptimizerSettings(lr=0.1, warmup_steps=4))
    lrs = []
    for step in range(6):
        if step == 2:  # a non-finite gradient: no step, no warm-up progress
            param.grad = torch.full((3,), float("nan"))
            grad_norm, applied = optimizer.step()
            assert math.isnan(grad_norm) and not applied and param.grad is None
        backward(quadratic([param]), optimizer)
        optimizer.step()
        lrs.append(optimizer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert optimizer.steps == 6


def test_clipping_reports_the_pre_clip_norm_and_clips():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = RoleOptimizer("g", [param], OptimizerSettings(lr=1.0, grad_clip=0.5, betas=(0.0, 0.0)))
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    captured = {}
    optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: captured.update(grad=param.grad.clone()))
    grad_norm, applied = optimizer.step()
    assert applied and grad_norm == pytest.approx(5.0)
    torch.testing.assert_close(captured["grad"], torch.tensor([0.3, 0.4, 0.0, 0.0]))


def test_accumulated_micro_batches_equal_one_batch():
    data = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    whole, parts = (torch.nn.Parameter(torch.zeros(3)) for _ in range(2))
    whole_opt = RoleOptimizer("w", [whole], OptimizerSettings(lr=0.1))
    parts_opt = RoleOptimizer("p", [parts], OptimizerSettings(lr=0.1))
    backward(((data - whole) ** 2).mean(), whole_opt)
    for chunk in data.split(2):
        backward(((chunk - parts) ** 2).mean() * len(chunk) / len(data), parts_opt)
    torch.testing.assert_close(parts.grad, whole.grad)
    whole_opt.step(), parts_opt.step()
    torch.testing.assert_close(parts, whole)


def test_backward_writes_only_the_given_roles_gradients():
    mine, other = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = RoleOptimizer("mine", [mine], OptimizerSettings(lr=0.1))
    backward((mine * other).sum(), optimizer)
    assert mine.grad is not None and other.grad is None


def test_trainable_parameters_must_be_float32():
    with pytest.raises(ValueError, match="float32"):
        RoleOptimizer("g", [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], OptimizerSettings(lr=1e-4))


def test_state_round_trip_and_callbacks_after_applied_steps():
    calls = []
    first = torch.nn.Parameter(torch.zeros(2))
    optimizer = RoleOptimizer("g", [first], OptimizerSettings(lr=0.1, warmup_steps=10),
                              after_step=[lambda: calls.append("ema")])
    for _ in range(3):
        backward(quadratic([first]), optimizer)
        optimizer.step()
    assert calls == ["ema"] * 3
    second = torch.nn.Parameter(first.detach().clone())
    restored = RoleOptimizer("g", [second], OptimizerSettings(lr=0.1, warmup_steps=10))
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as written out: torch shares the moment tensors
    for opt, param in ((optimizer, first), (restored, second)):
        backward(quadratic([param]), opt)
        opt.step()
    assert restored.steps == optimizer.steps == 4
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_a_resumed_optimiser_keeps_this_runs_betas_and_weight_decay():
    first = torch.nn.Parameter(torch.zeros(2))
    optimizer = RoleOptimizer("g", [first], OptimizerSettings(lr=0.1, weight_decay=0.01))
    backward(quadratic([first]), optimizer)
    optimizer.step()
    changed = RoleOptimizer("g", [torch.nn.Parameter(torch.zeros(2))],
                            OptimizerSettings(lr=0.1, betas=(0.0, 0.99), weight_decay=0.0))
    changed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    group = changed.optimizer.param_groups[0]
    assert group["betas"] == (0.0, 0.99) and group["weight_decay"] == 0.0 and changed.steps == 1


def test_buckets_split_by_size_dtype_and_device(monkeypatch):
    monkeypatch.setattr(optim, "BUCKET_BYTES", 40)
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(20)]
    assert [len(bucket) for bucket in optim._buckets(grads)] == [2, 1, 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_step(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda tensor, *args, **kwargs: calls.append(tensor.numel()) or original(tensor, *args, **kwargs)
    params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 3)),
              torch.nn.Parameter(torch.zeros(4))]
    optimizer = RoleOptimizer("g", params, OptimizerSettings(lr=0.1, betas=(0.0, 0.0)))
    params[0].grad = torch.full((5,), float(rank + 1))  # ranks 1 and 2 → mean 1.5
    params[1].grad = torch.full((2, 3), float(4 * rank))  # 0 and 4 → mean 2
    # params[2] has no gradient on either rank: it joins as zeros
    optimizer.step()
    results[rank] = {"calls": calls, "mean_grads": [float(optimizer.optimizer.state[p]["exp_avg"].mean())
                                                    for p in params[:2]],
                     "third_untouched": bool(torch.equal(params[2].detach(), torch.zeros(4)))}
    dist.destroy_process_group()


def test_one_bucketed_all_reduce_averages_gradients_over_two_gloo_ranks():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = mp.Manager().dict()
    mp.spawn(_two_rank_step, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["calls"] == [15]  # one flat all-reduce of 5 + 6 + 4 values
        assert results[rank]["mean_grads"] == pytest.approx([1.5, 2.0])  # β1 = 0: exp_avg is the gradient
        assert results[rank]["third_untouched"]
