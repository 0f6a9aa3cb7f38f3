"""`compile: true` in a run: the model trains compiled, and the weights are the full-batch ones."""

from __future__ import annotations

import functools

import torch

from bigbatch.core import compilation
from tests.core.test_compilation import CountingBackend
from tests.train.test_trainer import max_difference, reference_weights, train


def test_compile_key_trains_the_compiled_model_to_the_reference(monkeypatch):
    torch._dynamo.reset()
    backend = CountingBackend()  # aot_eager: inductor takes minutes per graph on a busy CPU
    compile_model = compilation.compile_model
    monkeypatch.setattr(
        compilation, "compile_model", functools.partial(compile_model, backend=backend)
    )
    config = dict(global_batch_size=64, micro_batch_size=24, max_steps=4, compile=True)
    summary, actual = train(config)
    assert backend.graphs >= 1  # the run's forward went through torch.compile
    assert max_difference(actual, reference_weights(64, 4, lr=0.05)) < 1e-10
    assert summary.steps == 4
    torch._dynamo.reset()
