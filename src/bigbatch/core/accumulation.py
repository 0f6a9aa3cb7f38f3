"""Where a window's gradients accumulate on one rank: ``.grad``, or the fp32 accumulation buffer.

With bf16 or fp16 parameters, adding every micro-batch's gradient into ``.grad`` rounds once per
micro-batch; `Fp32GradientBuffer` adds each into a float32 copy instead and rounds the sum to the
parameter dtype once, at the step, so that the split does not change the rounding (docs/design.md,
invariant 1). `WindowGradients` is what the engine holds: the gradients it scales, rounds and
clears, with the replication strategy's answers (shards, what else it holds, a buffer's sum over
ranks). `choose_accumulation_dtype` resolves ``accumulation_dtype="auto"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bigbatch.choices import ACCUMULATION_DTYPES, one_of
from bigbatch.core import distributed

if TYPE_CHECKING:
    from bigbatch.core.replication import Replication


class Fp32GradientBuffer:
    """Float32 sums of the trained parameters' gradients over one window.

    Args:
        parameters: the trained parameters, in the order the buffers follow.
        keep_gradients: ``.grad`` is storage someone else owns (DDP's buckets under
            ``gradient_as_bucket_view``): it is zeroed and written in place, never replaced.

    Attributes:
        tensors: one float32 buffer per parameter; None outside a window and before its first
            backward.
    """

    def __init__(
        self, parameters: list[torch.nn.Parameter], *, keep_gradients: bool = False
    ) -> None:
        self._parameters = parameters
        self._keep_gradients = keep_gradients
        self.tensors: list[torch.Tensor] | None = None

    def add_gradients(self) -> None:
        """Move this micro-batch's gradient from ``.grad`` into the buffers (4 bytes per trained
        parameter, allocated at the window's first backward)."""
        if self.tensors is None:
            self.tensors = [
                torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                for p in self._parameters
            ]
        for buffer, parameter in zip(self.tensors, self._parameters):
            if parameter.grad is not None:
                buffer.add_(parameter.grad)
                if self._keep_gradients:
                    parameter.grad.zero_()
                else:
                    parameter.grad = None

    def average_over_ranks(self, world_size: int) -> None:
        """Sum the buffers over ranks in one all-reduce and divide by world_size: DDP's average,
        so that the step's normalisation is the same as when DDP reduces ``.grad`` itself."""
        if self.tensors is None:
            return
        flat = torch.cat([buffer.reshape(-1) for buffer in self.tensors])
        distributed.all_reduce_sum(flat)
        flat.div_(world_size)
        offset = 0
        for buffer in self.tensors:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def round_to_parameters(self) -> None:
        """The step's one rounding: every ``.grad`` becomes its buffer in the parameter's dtype,
        written into the ``.grad`` there is (a bucket view stays one), else a new tensor (the
        buffers are released)."""
        if self.tensors is None:
            return
        for buffer, parameter in zip(self.tensors, self._parameters):
            if parameter.grad is None:
                parameter.grad = buffer.to(parameter.dtype)
            else:
                parameter.grad.copy_(buffer)
        self.tensors = None

    def clear(self) -> None:
        """Drop the window's sums (a step's end, or a window redone)."""
        self.tensors = None


class WindowGradients:
    """This rank's gradients of the window: in ``.grad``, or summed in an fp32 buffer.

    Args:
        parameters: the trained parameters.
        replication: the model's replication strategy; its ``accumulation_dtype`` says whether
            an fp32 buffer is used.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], replication: Replication) -> None:
        self._parameters = parameters
        self._replication = replication
        fp32 = replication.accumulation_dtype == "fp32"
        self._keep = replication.keeps_gradients
        self.buffer = Fp32GradientBuffer(parameters, keep_gradients=self._keep) if fp32 else None

    def after_backward(self) -> None:
        """After each micro-step's backward: move its gradient into the buffer, if there is one."""
        if self.buffer is not None:
            self.buffer.add_gradients()

    def after_window(self) -> None:
        """After the window's last backward: sum the buffer over ranks where the strategy says."""
        if self.buffer is not None:
            self._replication.reduce_buffer(self.buffer)

    def tensors(self) -> list[torch.Tensor]:
        """The accumulated gradients to scale and clip: the buffer's, else this rank's ``.grad``
        (its shards under FSDP2)."""
        if self.buffer is not None and self.buffer.tensors is not None:
            return self.buffer.tensors
        return self._replication.local_gradients(self._parameters)

    def round_to_parameters(self) -> None:
        """The step's one rounding of the buffer to the parameters' dtype (nothing without one)."""
        if self.buffer is not None:
            self.buffer.round_to_parameters()

    def clear(self) -> None:
        """Drop every gradient of the window: ``.grad``, the buffer and what the strategy holds.

        ``.grad`` is set to None (zero_grad(set_to_none=True), over the list already held: no
        module walk), or zeroed in place where it is a view into DDP's buckets: a new tensor
        there would be a second gradient until DDP's next sync copies it back.
        """
        if self._keep:
            kept = [p.grad for p in self._parameters if p.grad is not None]
            if kept:
                torch._foreach_zero_(kept)
        else:
            for parameter in self._parameters:
                parameter.grad = None
        if self.buffer is not None:
            self.buffer.clear()
        self._replication.clear()


def choose_accumulation_dtype(
    accumulation_dtype: str, parameters: list[torch.nn.Parameter], *, sharded: bool
) -> str:
    """``"fp32"`` or ``"param"``: the dtype asked for, or what ``auto`` picks.

    ``auto`` picks fp32 for bf16 or fp16 parameters, unless the gradients are sharded (FSDP2),
    where the reduce dtype of FSDP's mixed-precision policy does that job.

    Raises:
        ValueError: an unknown dtype, or ``"fp32"`` for sharded gradients.
    """
    if accumulation_dtype not in ACCUMULATION_DTYPES:
        raise ValueError(
            f"accumulation_dtype must be {one_of(ACCUMULATION_DTYPES)}, got {accumulation_dtype!r}"
        )
    if accumulation_dtype == "fp32" and sharded:
        raise ValueError(
            'accumulation_dtype="fp32" is not available under FSDP: shard with '
            "fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
            "reduce_dtype=torch.float32)) instead"
        )
    if accumulation_dtype != "auto":
        return accumulation_dtype
    low = any(p.dtype in (torch.bfloat16, torch.float16) for p in parameters)
    return "fp32" if low and not sharded else "param"
