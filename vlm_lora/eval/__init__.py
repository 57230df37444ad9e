"""Evaluation: batched captioning, scoring, reports.

Owns ``captioning`` (generation with the training prompts, adapter comparison, prediction files),
``coco`` (COCO-style ground truth), ``report`` (HTML report, contact sheet), ``plotting`` (loss
curves) and ``cli`` (the ``eval`` and ``score`` subcommands). May import data, adapters, lora,
metrics and modeling; never train.
"""
