"""compile_model: the exact step through a compiled forward, with no recompile after warm-up.

Inductor compiles on this machine but takes minutes per graph on a busy 2-core CPU, so these
tests compile with ``aot_eager`` (the same dynamo graph capture and AOT autograd, eager kernels);
`benchmarks/compile.py` measures inductor.
"""

from __future__ import annotations

import pytest
import torch

import bigbatch
from bigbatch.core.compilation import compile_model, is_compiled
from tests import models
from tests.reference import full_batch_sgd, relative_error

GLOBAL_BATCH, STEPS, LR = 11, 4, 0.5


class CountingBackend:
    """aot_eager, counting the graphs dynamo compiles (one per compile or recompile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, inputs: list) -> object:
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(graph, inputs)


def global_batches() -> list:
    tokens, labels = models.token_data(GLOBAL_BATCH * STEPS, seed=5)
    return [
        (
            tokens[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH],
            labels[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH],
        )
        for s in range(STEPS)
    ]


def window(global_batch: tuple, micro: int) -> list:
    tokens, labels = global_batch
    return [(tokens[i : i + micro], labels[i : i + micro]) for i in range(0, len(tokens), micro)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_steps_match_the_float64_full_batch_and_compile_only_in_warm_up():
    model = models.token_model()
    backend = CountingBackend()
    compile_model(model, backend=backend)
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR))
    graphs = []
    for step, global_batch in enumerate(global_batches()):
        # micro 4 on 11 rows: 4, 4, 3 (uneven); micro 5: 5, 5, 1 (a one-row micro-batch)
        accumulator.step(window(global_batch, 5 if step % 2 else 4), models.token_loss_fn)
        graphs.append(backend.graphs)
    expected = full_batch_sgd(models.token_model(), global_batches(), models.token_item_losses, LR)
    actual = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert relative_error(actual, expected) < 1e-12
    # step 0 compiles the dynamic-batch graph, step 1 the one-row graph; then nothing more
    assert graphs[0] >= 1 and graphs[1] == graphs[2] == graphs[3]


def test_the_batch_dimension_is_dynamic_from_the_first_call():
    model = models.mlp()
    backend = CountingBackend()
    compile_model(model, backend=backend)
    for rows in (4, 7, 2, 9, 3):
        x, y = models.regression_data(rows)
        eager = models.mse_per_sample(models.mlp(), x, y)
        torch.testing.assert_close(models.mse_per_sample(model, x, y), eager, rtol=1e-12, atol=0)
    assert backend.graphs == 1


def test_a_model_is_compiled_once():
    model = compile_model(models.mlp(), backend=CountingBackend())
    assert is_compiled(model) and not is_compiled(models.mlp())
    with pytest.raises(ValueError, match="compiled already"):
        compile_model(model, backend="aot_eager")
