"""Adapters on disk: PEFT-format save/load with base fingerprints, and merged-model export.

Owns ``peft_format`` (``save_adapter``, ``load_adapter``, the base fingerprint that refuses a
wrong base), ``merge`` (fold adapters into the base, export a plain transformers model; combine
several), ``arithmetic`` (merge methods on dense deltas, SVD / QR re-factoring) and ``multi``
(switch, sum, disable, delete adapters; a different adapter per batch row), ``export`` (a merged base
+ plain LoRA adapters + serve.sh for vLLM / SGLang), ``engine_rules`` (what each engine serves;
``check_adapter``) and ``folder`` (complete model folders: processor, tokenizer, chat template).
May import lora, architectures, planner, modeling, quantize and data (prompts for the merge
probe); never eval or train.
"""

from vlm_lora.adapters.peft_format import AdapterError, load_adapter, save_adapter

__all__ = ["AdapterError", "load_adapter", "save_adapter"]
