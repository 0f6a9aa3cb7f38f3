"""fp32 accumulation of bf16 parameters' gradients: rounded once per step, not once per micro-batch.

The error of the applied gradient against a float64 gradient, over 64 micro-batches: bigbatch's
default must match an fp32 buffer written here (within 15%) and beat accumulating in bf16.
"""

from __future__ import annotations

import pytest
import torch

import bigbatch

MICRO_BATCHES = 64
ROWS = 4


class Recorder(torch.optim.Optimizer):
    """Records the gradient the step would apply, in float64, and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.gradients: list[torch.Tensor] = []

    def step(self, closure=None):
        self.gradients = [
            p.grad.double().clone() for group in self.param_groups for p in group["params"]
        ]


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        dtype
    )


def data(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MICRO_BATCHES * ROWS, 16, generator=generator, dtype=torch.float64)
    y = torch.randn(MICRO_BATCHES * ROWS, 4, generator=generator, dtype=torch.float64)
    return [
        (x[i : i + ROWS].to(dtype), y[i : i + ROWS].to(dtype))
        for i in range(0, MICRO_BATCHES * ROWS, ROWS)
    ]


def loss_fn(model, micro_batch):
    x, y = micro_batch
    return (model(x) - y).pow(2).mean(dim=1).sum(), x.shape[0]


def float64_gradient() -> list[torch.Tensor]:
    # The bf16 model's own weights, in float64: only the arithmetic differs.
    model = make_model(torch.bfloat16).double()
    x = torch.cat([b[0] for b in data(torch.bfloat16)]).double()
    y = torch.cat([b[1] for b in data(torch.bfloat16)]).double()
    (model(x) - y).pow(2).mean(dim=1).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def fp32_buffer_gradient() -> list[torch.Tensor]:
    """The independent reference: every micro-batch's bf16 gradient added into an fp32 buffer."""
    model = make_model(torch.bfloat16)
    buffers = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for micro_batch in data(torch.bfloat16):
        loss_sum, _ = loss_fn(model, micro_batch)
        loss_sum.float().backward()
        for buffer, p in zip(buffers, model.parameters()):
            buffer += p.grad
            p.grad = None
    return [(b / (MICRO_BATCHES * ROWS)).to(torch.bfloat16).double() for b in buffers]


def engine_gradient(accumulation_dtype: str) -> list[torch.Tensor]:
    model = make_model(torch.bfloat16)
    optimizer = Recorder(model.parameters())
    accumulator = bigbatch.Accumulator(model, optimizer, accumulation_dtype=accumulation_dtype)
    accumulator.step(data(torch.bfloat16), loss_fn)
    return optimizer.gradients


def error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    difference = sum(float((a - e).pow(2).sum()) for a, e in zip(actual, expected))
    return (difference / sum(float(e.pow(2).sum()) for e in expected)) ** 0.5


def test_fp32_accumulation_of_bf16_gradients():
    expected = float64_gradient()
    reference = error(fp32_buffer_gradient(), expected)
    default = error(engine_gradient("auto"), expected)
    fp32 = error(engine_gradient("fp32"), expected)
    in_bf16 = error(engine_gradient("param"), expected)
    assert default == fp32
    assert abs(default - reference) <= 0.15 * reference
    assert in_bf16 > 1.5 * default, (in_bf16, default)


def test_fp32_accumulation_is_auto_only_for_low_precision():
    model = make_model(torch.float64)
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert accumulator.accumulation_dtype == "param"
    low = make_model(torch.bfloat16)
    accumulator = bigbatch.Accumulator(low, torch.optim.SGD(low.parameters(), lr=0.1))
    assert accumulator.accumulation_dtype == "fp32"
    with pytest.raises(ValueError, match="accumulation_dtype"):
        bigbatch.Accumulator(low, torch.optim.SGD(low.parameters(), lr=0.1), accumulation_dtype="x")
