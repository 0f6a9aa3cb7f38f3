"""The window's totals and the one read: what each named figure sums, and where each part lands."""

from __future__ import annotations

import torch

from bigbatch.core.window import WindowTotals, local_totals, reduce_and_read

CPU = torch.device("cpu")


def test_local_totals_sum_host_and_device_counts_and_flag_the_bad_ones():
    loss_sums = [torch.tensor(1.5), torch.tensor(2.0, dtype=torch.float64)]
    counts = [3.0, torch.tensor(2.5, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)]
    totals = WindowTotals(*local_totals(loss_sums, [*counts, 4.0], True, CPU).tolist())
    # 3 + 2.5 - 1 + 4 items; 2.5 is not an integer and -1 is negative
    assert totals == WindowTotals(
        loss_sum=3.5, num_items=8.5, num_invalid_counts=2.0, num_out_of_memory=1.0
    )
    assert local_totals([], [], False, CPU).tolist() == [0.0, 0.0, 0.0, 0.0]


class ConstantStatistics:
    """A window statistic whose local sums are fixed numbers."""

    def __init__(self, values: list[float], host_sums: bool) -> None:
        self.values, self.host_sums = values, host_sums

    def local_statistics(self, backward_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float64)


def test_one_read_hands_each_statistic_its_own_sums():
    on_host, on_device = ConstantStatistics([7.0, 8.0], True), ConstantStatistics([9.0], False)
    totals = torch.tensor([6.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    read = reduce_and_read(
        totals,
        [on_host, on_device],  # type: ignore[list-item]
        torch.tensor(5.0),
        backward_scale=1.0,
        over_ranks=False,
    )
    assert read.totals == WindowTotals(6.0, 3.0, 0.0, 0.0)
    assert read.grad_norm == 5.0
    assert [sums.tolist() for sums in read.sums] == [[7.0, 8.0], [9.0]]
