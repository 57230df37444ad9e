"""Training: the accelerate loop and what surrounds it.

Owns the run: ``setup`` (model, task and data for a recipe), ``tasks`` (captioning and
classification objectives), ``optim`` (parameter groups, optimizer, schedules, data order),
``checkpoint`` (atomic checkpoints, exact resume), ``pixels`` (a recipe's pixel budget on the processor), ``run_log`` (metrics, summary) and ``loop``
(``finetune``). The highest layer below the CLI: it may import every other subpackage
(lora, architectures, planner, data, adapters, eval, metrics); nothing below imports it.
"""

from vlm_lora.train.loop import finetune

__all__ = ["finetune"]
