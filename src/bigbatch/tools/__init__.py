"""Tools around the step: the memory probe and micro-batch choice, `verify` and `bench`.

`memory` measures what one forward + backward costs per micro-batch size, `rank_memory` and
`projection` carry it over to one rank of a layout, `search` and `choice` pick the micro-batch for
a memory budget in samples or tokens, `micro_setting` is what training calls, `autobatch` and
`autotokens` plan for `bigbatch plan`, `verify` compares full-batch and accumulated gradients, and
`bench` runs the quick benchmarks of `bigbatch bench`.

May import: `bigbatch.data`, `bigbatch.core`, `bigbatch.recipes`, `bigbatch.planning` and the small
shared helpers. Never `bigbatch.train` or the command line.
"""
