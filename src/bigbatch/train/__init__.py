"""Config in, run directory out: the trainer and everything a run records.

The config schema (`config`) and its loading (`configfile`), the global batch, plan and learning
rate of every step (`planner`, over the pure rules of `schedules`), the loop (`trainer`) over a
typed `state.TrainState`, evaluation, early warning, the run directory, checkpoints, metrics and
the report.

May import: `bigbatch.tools`, `bigbatch.data`, `bigbatch.core`, `bigbatch.recipes`,
`bigbatch.planning` and the small shared helpers. Never the command line.
"""
