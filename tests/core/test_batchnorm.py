"""BatchNorm policies against independent references: one full-batch forward of a copy (float64)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from bigbatch.core.batchnorm import (
    WindowBatchNormStatistics,
    apply_policy,
    find_batchnorm,
    warn_small_micro_batches,
)


def conv_net(momentum: float | None = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8, momentum=momentum),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 12),
        torch.nn.BatchNorm1d(12, momentum=momentum),
        torch.nn.Linear(12, 2),
    ).double()


class TwoBranchNet(torch.nn.Module):
    """A BatchNorm2d and a BatchNorm1d side by side: neither's input depends on the other's output.

    (Behind a BatchNorm, a layer's input depends on how the micro-batch was normalised, so no
    accumulation can reproduce a full-batch forward's statistics there.)
    """

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn2d = torch.nn.BatchNorm2d(8, momentum=momentum)
        self.linear = torch.nn.Linear(3 * 6 * 6, 12)
        self.bn1d = torch.nn.BatchNorm1d(12, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.bn2d(self.conv(x)).mean(dim=(1, 2, 3))
        flat = self.bn1d(self.linear(x.flatten(1))).mean(dim=1)
        return image + flat


def two_branch_net(momentum: float | None = 0.1) -> torch.nn.Module:
    return TwoBranchNet(momentum).double()


def sequence_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv1d(2, 4, 1), torch.nn.BatchNorm1d(4)).double()


def running_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


def assert_same_running(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    a, e = running_state(actual), running_state(expected)
    assert a.keys() == e.keys() and len(a) > 0
    for key in e:
        torch.testing.assert_close(a[key], e[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    ("make_model", "shape"),
    [
        (two_branch_net, (3, 6, 6)),
        (lambda: two_branch_net(momentum=None), (3, 6, 6)),
        (sequence_net, (2, 5)),
    ],
    ids=["bn2d+bn1d", "cumulative-momentum", "bn1d-3d-input"],
)
def test_window_running_stats_equal_one_full_batch_forward(make_model, shape):
    model = make_model()
    reference = copy.deepcopy(model)
    window = WindowBatchNormStatistics(model)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):  # three steps, each with uneven micro-batches
        x = 2.0 + 3.0 * torch.randn(11, *shape, generator=generator, dtype=torch.float64)
        window.begin_window()
        for start, stop in [(0, 2), (2, 7), (7, 11)]:
            model(x[start:stop]).sum().backward()
        window.end_window()
        reference(x)  # the independent reference: one forward over the whole global batch
        assert_same_running(model, reference)
    window.remove()


def test_window_pools_over_ranks_by_summing_local_statistics():
    # Two "ranks" (two copies) with different micro-batches; summing their local statistics is
    # what the engine's SUM all-reduce does.
    model = two_branch_net()
    ranks = [copy.deepcopy(model), copy.deepcopy(model)]
    windows = [WindowBatchNormStatistics(m) for m in ranks]
    x = torch.randn(9, 3, 6, 6, dtype=torch.float64)
    shares = [[(0, 3), (3, 5)], [(5, 7), (7, 9)]]
    for rank_model, window, share in zip(ranks, windows, shares):
        window.begin_window()
        for start, stop in share:
            rank_model(x[start:stop])
    reduced = windows[0].local_statistics() + windows[1].local_statistics()
    for window in windows:
        window.end_window(reduced)
    model(x)
    for rank_model in ranks:
        assert_same_running(rank_model, model)


def test_window_ignores_eval_forwards_and_retried_windows():
    model = two_branch_net()
    reference = copy.deepcopy(model)
    window = WindowBatchNormStatistics(model)
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    window.begin_window()
    model(x[:2])  # a window given up half way (e.g. out of memory): begin again
    window.begin_window()
    model(x[:3])
    model.eval()
    model(torch.randn(4, 3, 6, 6, dtype=torch.float64))  # eval forwards do not count
    model.train()
    model(x[3:])
    window.end_window()
    reference(x)
    assert_same_running(model, reference)


def test_groupnorm_keeps_every_parameter_trainable_and_the_optimizer_sees_them():
    model = conv_net()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    converted = apply_policy(model, "groupnorm")
    assert find_batchnorm(converted) == []
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(2, 8), (3, 12)]
    after = dict(converted.named_parameters())
    assert after.keys() == before.keys()  # same names: BatchNorm's weight and bias live on
    for name, p in after.items():
        assert p.requires_grad and torch.equal(p.detach(), before[name]), name
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in after.values()}
    converted(torch.randn(2, 3, 6, 6, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in after.values())


def test_freeze_keeps_running_stats_through_train_mode_forwards_and_trains_affine():
    model = apply_policy(conv_net(), "freeze")
    model.train()
    frozen = running_state(model)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    output = model(x)
    output.sum().backward()
    for key, value in running_state(model).items():
        assert torch.equal(value, frozen[key]), key
    # Normalised with the running statistics, as a reference copy in eval mode does.
    reference = copy.deepcopy(model).eval()
    torch.testing.assert_close(output, reference(x), rtol=0, atol=0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert module.weight.grad is not None and module.bias.grad is not None


def test_warning_fires_once_naming_the_layers():
    model = conv_net()
    with pytest.warns(UserWarning, match=r"\(1, 5\)") as record:
        assert warn_small_micro_batches(model, micro_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_small_micro_batches(model, micro_batch_size=4)
        assert not warn_small_micro_batches(conv_net(), micro_batch_size=16)
        frozen = apply_policy(conv_net(), "freeze")  # frozen layers use no batch statistics
        assert not warn_small_micro_batches(frozen, micro_batch_size=4)
    assert len(record) == 1
    message = str(record[0].message)
    for option in ("keep", "sync", "freeze", "groupnorm", "window"):
        assert f"  {option}: " in message


def test_bad_policy_and_sync_without_ranks():
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        apply_policy(conv_net(), "layernorm")  # type: ignore[arg-type]
    model = conv_net()
    with pytest.warns(UserWarning, match="no effect with world_size 1"):
        assert apply_policy(model, "sync") is model
    assert apply_policy(model, "window") is model


def window_on_rank(rank: int, world_size: int) -> dict:
    from bigbatch.core import distributed

    model = two_branch_net()
    x = torch.randn(9, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    share = [[(0, 3), (3, 5)], [(5, 7), (7, 9)]][rank]
    window = WindowBatchNormStatistics(model)
    window.begin_window()
    for start, stop in share:
        model(x[start:stop])
    window.end_window(distributed.all_reduce_sum(window.local_statistics()))
    return running_state(model)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_window_statistics_over_two_processes_equal_the_global_batch_forward():
    from tests.distributed_helpers import run_processes

    reference = two_branch_net()
    reference(
        torch.randn(9, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    )
    expected = running_state(reference)
    for state in run_processes(window_on_rank, 2):
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], rtol=1e-12, atol=1e-12)
