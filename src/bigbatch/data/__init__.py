"""Split-invariant data: which items each optimizer step consumes, and this rank's windows.

`sampler.GlobalBatchSampler` decides the items of global step t from a seeded per-epoch
permutation, whatever the world size, micro-batch or accumulation (docs/design.md, invariant 3);
`loader.WindowLoader` cuts each global batch with the step's `Plan` into this rank's window.

May import: `bigbatch.core`, `bigbatch.plan` and the small shared helpers.
"""
