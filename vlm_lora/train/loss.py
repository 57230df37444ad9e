"""The next-token loss with ``lm_head`` applied to the labelled positions only.

In a VLM batch most positions are image and prompt tokens whose labels are ``-100``: the model's own
loss computes their logits ([B, S, vocab], then an fp32 copy) and throws them away. Here a forward
pre-hook on the output embedding gathers the hidden states of the positions whose *next* token is
labelled, so ``lm_head`` and the cross-entropy see [N, hidden] and [N, vocab] only (N = answer tokens).
The loss is the model's own (mean cross-entropy over the labelled next tokens, fp32 logits) and so are
the gradients: ignored positions contribute exact zeros to both. The whole model forward still runs
through ``model(...)``, so autocast, DDP and FSDP hooks and LoRA on ``lm_head`` work as before.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from vlm_lora.data.datasets import IGNORE_INDEX
from vlm_lora.data.labelled import LABELLED_POSITIONS, next_token_targets, positions_of

# model types whose forward is ``logits = lm_head(hidden_states)`` over the whole sequence followed by
# transformers' causal-LM loss (shift by one, ignore -100, mean): the gather below gives their loss exactly
HEAD_ON_LABELS_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def supports_labelled_head(model) -> bool:
    """Whether :func:`labelled_token_loss` computes ``model``'s own loss (DDP-wrapped models included)."""
    inner = getattr(model, "module", model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    return (model_type in HEAD_ON_LABELS_MODEL_TYPES and hasattr(inner, "get_output_embeddings")
            and isinstance(inner.get_output_embeddings(), torch.nn.Module))


def training_kwargs(model) -> dict:
    """``{"use_cache": False}`` when ``model``'s forward takes ``use_cache`` (or passes ``**kwargs`` on): a training forward needs no KV cache,
    and with one each decoder layer writes its own cache slot, which makes ``torch.compile`` recompile every
    layer (past the cache limit the rest run eager)."""
    return {"use_cache": False} if _takes_use_cache(type(getattr(model, "module", model))) else {}


@functools.cache  # called every step: read each model class's signature once
def _takes_use_cache(model_class: type) -> bool:
    parameters = inspect.signature(model_class.forward).parameters
    return "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def labelled_token_loss(model, batch: dict, **forward_kwargs) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (with ``labels`` [B, S]) over its labelled tokens,
    ``lm_head`` applied to those positions only; equals ``model(**batch).loss``. The positions come with the
    batch (``LABELLED_POSITIONS``, found on the CPU by the training loader), or are found here."""
    targets = next_token_targets(batch["labels"]).flatten()  # [B * S]
    index = batch.get(LABELLED_POSITIONS)  # [N]
    if index is None:  # a nonzero on the device: on CUDA the host waits for the GPU here
        index = positions_of(targets)
    head = getattr(model, "module", model).get_output_embeddings()

    def gather(module, args):
        hidden = args[0]  # [B, S, hidden]
        return (hidden.flatten(0, -2).index_select(0, index), *args[1:])  # [N, hidden]

    handle = head.register_forward_pre_hook(gather)
    try:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", LABELLED_POSITIONS)}
        logits = model(**inputs, **forward_kwargs).logits  # [N, vocab]
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != index.numel():
        raise RuntimeError(f"labelled-position loss: {type(getattr(model, 'module', model)).__name__} returned logits "
                           f"{tuple(logits.shape)} from {index.numel()} gathered positions; set "
                           f"train.head_on_labels: false for this model")
    return F.cross_entropy(logits.float(), targets.index_select(0, index), ignore_index=IGNORE_INDEX)
