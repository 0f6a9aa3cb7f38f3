"""Adapters that bring the exact step into the frameworks people already use.

`huggingface`: loss functions for any `transformers` model that return (loss_sum, num_items), and
the HF Trainer's batch arguments from a plan. `trl`: TRL's `DPOTrainer` made exact by a mixin,
and loss functions over TRL's preference and GRPO batches. `accelerate`: the exact step on an
`accelerator.prepare`d model, optimizer and dataloader. `lightning`: a LightningModule mixin with
manual optimization, exact under DDP. `window` cuts a rank's batch into the window they share.

May import: `core` and the base (`bigbatch.planning`, `bigbatch.choices`, `bigbatch.units`). The
frameworks themselves are imported only inside these modules, never by ``import bigbatch``.
"""
