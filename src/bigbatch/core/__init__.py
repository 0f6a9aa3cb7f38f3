"""The exact step and what it needs, usable inside anyone's training loop.

`engine.Accumulator.step(window, loss_fn)` applies one optimizer step whose gradient is that of
(sum of every item's loss) / (number of items), whatever the split; around it: the replication
strategies, local, DDP and FSDP2 (`replication`), a window's micro-steps (`microsteps`), the fp32
accumulation buffer (`accumulation`), the step's optional statistics (`statistics`), reading the
loss (`loss`), the window's totals and statistics (`window`), mixed precision (`precision`),
out-of-memory re-split (`recovery`), nested batches (`batches`), ranks and collectives
(`distributed`), the gradient noise scale (`noise`), the BatchNorm policies (`batchnorm`,
`syncnorm`, `runningstats`) and activation checkpointing of a model's units (`checkpointing`).

May import: torch, `bigbatch.planning` and the small shared helpers (`bigbatch.choices`,
`bigbatch.units`). Never `data`, `train`, `tools`, `recipes` or the command line.
"""
