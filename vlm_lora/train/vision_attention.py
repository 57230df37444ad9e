"""``train.batched_vision_attention``: Qwen-VL vision towers attend within each window or image in a few calls.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers attend within chunks of the flattened patch sequence:
one image, or in Qwen2.5-VL's windowed layers one window of up to 8 x 8 patches. ``cu_seqlens`` [chunks + 1]
marks the chunks. Without FlashAttention's varlen kernel, transformers handles this in two costly steps:

- it reads the chunk lengths back from the GPU in every layer (``.tolist()``, a host sync);
- it runs one SDPA call per chunk. A 728 px image has 49 windows, and 28 of Qwen2.5-VL's 32 vision layers
  are windowed.

Here the chunks of equal length go through one batched SDPA call. Window lengths take few values: full
windows, and the smaller ones at the right and bottom edges. The lengths are read once per ``cu_seqlens``
tensor, which every layer of one forward shares. Each chunk gets the same attention as before, with the
same kernel; only the batch dimension differs. A test compares the tower's outputs and gradients with the
per-chunk path.
"""

from __future__ import annotations

import logging
import sys
import types
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# vision attention classes whose forward is transformers' chunked ``cu_seqlens`` attention (the same code in
# each, checked for transformers 5.17 and 5.25): class name -> the module that defines it
CHUNKED_VISION_ATTENTION = {
    "VisionAttention": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "Qwen2_5_VLVisionAttention": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "Qwen3VLVisionAttention": "transformers.models.qwen3_vl.modeling_qwen3_vl",
}
# ``train.batched_vision_attention: auto`` replaces transformers' forward only for the releases it was read
# against (first, last: inclusive, by major.minor); outside them the recipe's ``true`` still applies it
CHECKED_TRANSFORMERS = ((5, 17), (5, 25))


class ChunkPlan:
    """How to batch the chunks marked by one ``cu_seqlens``: groups of equal length, in a permuted order.

    ``order`` [L] (None when the chunks are already grouped) gathers the positions group by group;
    ``inverse`` undoes it; ``groups`` lists (chunk length, chunk count) in that order."""

    def __init__(self, cu_seqlens: torch.Tensor):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the one host read for this cu_seqlens
        starts, position = [], 0
        for length in lengths:
            starts.append(position)
            position += length
        by_length: dict[int, list[int]] = {}
        for start, length in zip(starts, lengths):
            if length:
                by_length.setdefault(length, []).append(start)
        self.groups = [(length, len(group)) for length, group in by_length.items()]
        grouped = [start + i for length, group in by_length.items() for start in group for i in range(length)]
        if grouped == list(range(position)):
            self.order = self.inverse = None
        else:
            self.order = torch.tensor(grouped, device=cu_seqlens.device)
            self.inverse = torch.argsort(self.order)


class PlanCache:
    """``ChunkPlan`` per ``cu_seqlens`` tensor object (the layers of one forward share it); a dead weak
    reference means the tensor is gone, so a new tensor that reuses its id is never matched."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[weakref.ref, ChunkPlan]] = []

    @torch.compiler.disable  # under train.compile: one clean break here, not a host read traced into the graph
    def get(self, cu_seqlens: torch.Tensor) -> ChunkPlan:
        for ref, plan in self.entries:
            if ref() is cu_seqlens:
                return plan
        plan = ChunkPlan(cu_seqlens)
        self.entries = [(weakref.ref(cu_seqlens), plan), *self.entries][: self.size]
        return plan


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: ChunkPlan,
                      scaling: float) -> torch.Tensor:
    """[1, heads, L, d] query/key/value -> [L, heads, d]: attention within each chunk of ``plan``."""
    if plan.order is not None:
        query, key, value = (t.index_select(2, plan.order) for t in (query, key, value))
    heads, dim = query.shape[1], query.shape[-1]
    outputs, offset = [], 0
    for length, count in plan.groups:
        size = length * count

        def chunks(t: torch.Tensor) -> torch.Tensor:  # [1, heads, L, d] -> [count, heads, length, d]
            return t[0, :, offset:offset + size].reshape(heads, count, length, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(chunks(query), chunks(key), chunks(value), scale=scaling)
        outputs.append(out.transpose(1, 2).reshape(size, heads, dim))  # tokens first, chunk by chunk
        offset += size
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out.index_select(0, plan.inverse) if plan.inverse is not None else out


def _batched_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None,
                     max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """transformers' chunked vision attention forward ([L, hidden] -> [L, hidden]), chunks batched."""
    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = self._rotary(query, key, cos, sin)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, heads, L, d]
    out = chunked_attention(query, key, value, self._chunk_plans.get(cu_seqlens), self.scaling)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def is_chunked_vision_attention(module: torch.nn.Module) -> bool:
    return CHUNKED_VISION_ATTENTION.get(type(module).__name__) == type(module).__module__


def batch_vision_attention(model: torch.nn.Module, sdpa_only: bool = False) -> int:
    """Give every chunked vision attention module of ``model`` the batched forward; returns how many.
    Modules under FlashAttention keep theirs (its varlen kernel already takes every chunk in one call);
    with ``sdpa_only`` so do modules under any other implementation than SDPA (e.g. eager)."""
    plans = PlanCache()
    count = 0
    for module in model.modules():
        if not is_chunked_vision_attention(module):
            continue
        implementation = str(getattr(module.config, "_attn_implementation", "") or "sdpa")
        if "flash" in implementation or (sdpa_only and implementation != "sdpa"):
            continue
        module._rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        module._chunk_plans = plans
        module.forward = types.MethodType(_batched_forward, module)
        count += 1
    return count


def transformers_release() -> tuple[int, int]:
    """The installed transformers' (major, minor)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release[:2]


def batch_vision_attention_if_checked(model: torch.nn.Module) -> int:
    """``train.batched_vision_attention: auto``: batch the chunked vision attention when this transformers
    release is one the replaced forward was checked against, for modules under SDPA; returns how many
    modules were batched."""
    first, last = CHECKED_TRANSFORMERS
    release = transformers_release()
    if not first <= release <= last:
        if any(is_chunked_vision_attention(module) for module in model.modules()):
            log.info("train.batched_vision_attention: auto leaves transformers' vision attention as it is: "
                     "transformers %d.%d is outside the checked releases %d.%d-%d.%d (set true to batch anyway)",
                     *release, *first, *last)
        return 0
    count = batch_vision_attention(model, sdpa_only=True)
    if count:
        log.info("train.batched_vision_attention: %d vision attention layers batched by chunk length", count)
    return count
