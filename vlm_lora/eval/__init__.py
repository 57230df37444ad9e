"""Evaluation: batched captioning, question answering, scoring, reports.

Owns ``captioning`` (generation with the training prompts, adapter comparison, prediction files),
``tasks`` (question answering and multiple choice: per-sample prompts, scoring, comparison),
``pixels`` (the adapters' pixel budget onto the processor), ``coco`` (COCO-style ground truth),
``report`` (HTML report, contact sheet), ``plotting`` (loss curves) and ``cli`` (the ``eval`` and
``score`` subcommands). May import data, adapters, lora, metrics and modeling; never train.
"""
