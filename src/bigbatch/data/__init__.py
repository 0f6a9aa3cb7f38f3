"""Split-invariant data: which samples each optimizer step consumes, and this rank's windows.

`sampler.GlobalBatchSampler` decides the samples of global step t from a seeded per-epoch
permutation, whatever the world size, micro-batch or accumulation (docs/design.md, invariant 3),
in samples or in tokens; `loader.WindowLoader` splits each global batch with the batch unit into
this rank's window, one loader for both units.

May import: `bigbatch.core`, `bigbatch.planning` and the small shared helpers.
"""
