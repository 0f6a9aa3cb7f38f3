"""GPU: tokens/s and model FLOPs utilisation of a GPT-2-small-sized model in bf16.

A GPT-2 small written in plain torch (12 layers, 768 wide, 12 heads, vocabulary 50257, context
1024, tied embeddings: 124.4M parameters) trains on random tokens under bf16 autocast with fp32
weights and fused AdamW. `Accumulator.step` and the hand-written loop (mean loss / k, backward,
clip, step, zero) run the same micro-batches interleaved; the figure is the median step time.
MFU = 6 x parameters x tokens/s / peak dense bf16 FLOP/s (H100 SXM and H200: 989 TFLOP/s;
attention FLOPs not counted, so it is conservative).

    python benchmarks/gpu.py                 # on a CUDA machine; writes results/gpu.{md,png}
    python benchmarks/gpu.py --compile       # the same with torch.compile
    python benchmarks/gpu.py --smoke         # a tiny model on CPU (or GPU): checks the code path
Without a CUDA device (and without --smoke) it prints "no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import bigbatch

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish, pyplot, save_figure  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the model; the defaults are GPT-2 small."""

    vocab_size: int = 50257
    context: int = 1024
    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12


SMOKE = GPTConfig(vocab_size=256, context=32, num_layers=2, d_model=64, num_heads=4)


class Block(torch.nn.Module):
    """Pre-norm block: causal self-attention (scaled_dot_product_attention) and a 4x GELU MLP."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.norm1 = torch.nn.LayerNorm(config.d_model)
        self.qkv = torch.nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = torch.nn.Linear(config.d_model, config.d_model)
        self.norm2 = torch.nn.LayerNorm(config.d_model)
        self.up = torch.nn.Linear(config.d_model, 4 * config.d_model)
        self.down = torch.nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        samples, positions, width = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden)).split(width, dim=2)
        q, k, v = (
            t.view(samples, positions, self.num_heads, -1).transpose(1, 2) for t in (q, k, v)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden = hidden + self.proj(attended.transpose(1, 2).reshape(samples, positions, width))
        return hidden + self.down(F.gelu(self.up(self.norm2(hidden)), approximate="tanh"))


class GPT(torch.nn.Module):
    """Token and position embeddings, blocks, final LayerNorm, head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(config.vocab_size, config.d_model)
        self.positions = torch.nn.Embedding(config.context, config.d_model)
        self.blocks = torch.nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = torch.nn.LayerNorm(config.d_model)
        self.head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tokens.weight
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied head counted once)."""
    return sum(p.numel() for p in model.parameters())


def loss_sum(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    inputs, targets = batch
    logits = model(inputs)
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return total, targets.numel()


def hand_written_step(model, optimizer, window, max_grad_norm: float, device_type: str) -> None:
    """The textbook bf16 loop: autocast forward, mean loss / k, backward; clip, step, zero once."""
    for inputs, targets in window:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / len(window)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_window(config: GPTConfig, micro: int, accumulation: int, context: int, device):
    generator = torch.Generator().manual_seed(0)
    window = []
    for _ in range(accumulation):
        tokens = torch.randint(0, config.vocab_size, (micro, context + 1), generator=generator)
        window.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return window


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=fused)


def measure(config, micro, accumulation, context, steps, warmup, device, compile_model):
    """Median seconds per step of both methods (interleaved) and the peak memory."""
    model = GPT(config).to(device)
    models = {"hand-written loop": model, "bigbatch Accumulator.step": copy.deepcopy(model)}
    if compile_model:
        models = {name: torch.compile(m) for name, m in models.items()}
    optimizers = {name: _optimizer(m, device) for name, m in models.items()}
    accumulator = bigbatch.Accumulator(
        models["bigbatch Accumulator.step"],
        optimizers["bigbatch Accumulator.step"],
        max_grad_norm=1.0,
        precision="bf16",
    )
    window = make_window(config, micro, accumulation, context, device)
    steps_by_name = {
        "hand-written loop": lambda: hand_written_step(
            models["hand-written loop"],
            optimizers["hand-written loop"],
            window,
            1.0,
            device.type,
        ),
        "bigbatch Accumulator.step": lambda: accumulator.step(window, loss_sum),
    }
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for index in range(warmup + steps):
        for name, step in steps_by_name.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {name: statistics.median(t) for name, t in times.items()}, num_parameters(model), peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, given_tflops: float | None) -> float | None:
    if given_tflops is not None:
        return given_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def run_fitting(config, args, device):
    """measure(), halving the micro-batch (and doubling k, same global batch) on out-of-memory."""
    micro, accumulation = args.micro_batch_size, args.accumulation
    while True:
        try:
            return micro, accumulation, measure(
                config, micro, accumulation, args.context, args.steps, args.warmup, device,
                args.compile,
            )  # fmt: skip
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            print(f"out of memory at micro-batch {micro}: retrying with {micro // 2}")
        torch.cuda.empty_cache()
        micro, accumulation = micro // 2, accumulation * 2


def main() -> None:
    parser = argument_parser(__doc__, "tiny model, two steps (CI)")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: skipped")
        return
    device = torch.device("cuda" if cuda else "cpu")
    config = GPTConfig(context=args.context)
    if args.smoke:
        config = SMOKE
        args.micro_batch_size, args.accumulation, args.context = 2, 2, SMOKE.context
        args.steps, args.warmup = 2, 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    micro, accumulation, (seconds, parameters, peak_bytes) = run_fitting(config, args, device)
    tokens = micro * accumulation * args.context
    peak = peak_flops(device, args.peak_tflops)
    hand = seconds["hand-written loop"]
    rows = [
        "| method | micro x k x context | step time | tokens/s | MFU | vs hand-written |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    figures = {}
    for name, step_s in seconds.items():
        tokens_per_s = tokens / step_s
        mfu = 6 * parameters * tokens_per_s / peak if peak else None
        figures[name] = (tokens_per_s, mfu)
        rows.append(
            f"| {name} | {micro} x {accumulation} x {args.context} | {step_s * 1e3:.1f} ms "
            f"| {tokens_per_s:,.0f} | {f'{mfu:.1%}' if mfu is not None else 'n/a'} "
            f"| {hand / step_s:.3f} |"
        )
    table = "\n".join(rows)
    where = torch.cuda.get_device_name(device) if cuda else "CPU (smoke)"
    note = (
        f"{where}, torch {torch.__version__}; {parameters / 1e6:.1f}M parameters, bf16 autocast, "
        f"fp32 weights, {'fused ' if cuda else ''}AdamW, clip 1.0"
        f"{', torch.compile' if args.compile else ''}; median of {args.steps} interleaved steps "
        f"after {args.warmup} warm-up; peak memory {peak_bytes / 2**30:.1f} GiB; "
        + (
            f"MFU = 6 x params x tokens/s / {peak / 1e12:.0f} TFLOP/s."
            if peak
            else "MFU needs the device's bf16 peak (--peak-tflops)."
        )
    )
    publish("gpu", table, note, smoke=args.smoke, plot=lambda path: plot(figures, path))


def plot(figures: dict[str, tuple[float, float | None]], path: Path) -> None:
    plt = pyplot()
    names = list(figures)
    figure, axis = plt.subplots(figsize=(7, 2.8))
    values = [figures[name][0] for name in names]
    axis.barh(names, values, color=["#999", "#4a4"])
    for y, name in enumerate(names):
        tokens_per_s, mfu = figures[name]
        label = f" {tokens_per_s:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else "")
        axis.text(tokens_per_s, y, label, va="center")
    axis.set_xlim(0, max(values) * 1.6)
    axis.set_xlabel("tokens / s (GPT-2 small, bf16)")
    save_figure(figure, path)


if __name__ == "__main__":
    sys.exit(main())
