"""``LoraMultiheadAttention``: per-slice LoRA on ``torch.nn.MultiheadAttention`` (open_clip's ViT).

``spec.slices`` is a subset of ``("q", "k", "v", "o")``: q/k/v are the row blocks of the fused
``in_proj_weight`` [3E, E], ``o`` is ``out_proj``. The forward pass never touches the base weights
(PEFT's MHA merges and unmerges them on every call): it runs the projections with the LoRA updates
added, ``F.scaled_dot_product_attention`` and ``out_proj``. When no adapter is left to add (all
merged, or disabled) it is simply the wrapped module's own forward.

PEFT format (peft 0.21, ``peft.tuners.lora.layer.MultiheadAttention``): PEFT always puts one LoRA
pair on the in-projection, at ``<path>.lora_A/lora_B`` ([R, E] / [3E, R]), and one on the output
projection, which it wraps in place as ``<path>.base_layer.out_proj.lora_A/lora_B`` ([R, E] / [E, R]);
both share the module's ``r`` and ``lora_alpha`` (``rank_pattern`` cannot tell them apart).
:meth:`LoraMultiheadAttention.peft_export` therefore returns

* suffix ``""``: the q/k/v blocks as one pair of rank R = n * r (n adapted q/k/v slices), B block-placed
  like :class:`~vlm_lora.lora.fused.FusedLinearLora`, alpha n * alpha; left out when no q/k/v slice;
* suffix ``"base_layer.out_proj"``: the ``o`` pair zero-padded to the same rank R (R = r when there is
  no q/k/v slice) with alpha scaled by R / r, so alpha / rank stays ``s``; left out without ``o``.

PEFT zero-initialises the B of a part that an adapter leaves out, so a module with only q/k/v, or only
``o``, loads into PEFT exactly. What PEFT cannot do is give the two parts different scalings; the padding
above avoids needing that.

Known PEFT bug (peft 0.21.2; huggingface/peft PR #3774): ``MultiheadAttention.merge`` writes
``W_o + dW_o`` and then calls ``out_proj.merge()``, which adds ``dW_o`` again, and its forward merges on
every call, so PEFT computes (and ``merge_and_unload`` bakes in) ``W_o + 2 dW_o``. The export here is the
faithful pair (PEFT's own ``get_delta_weight`` of it equals ours exactly); with an ``o`` slice, PEFT 0.21.2's
outputs therefore differ from ours by that doubled out_proj update, q/k/v alone match exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_lora.lora.variants import lora_scaling
from vlm_lora.lora.base import AdapterSpec, LoraLayer, PeftEntry, adapter_device
from vlm_lora.lora.fused import (add_slice_update, check_variant, export_blocks, full_width_update, import_blocks,
                                 merge_slice_rows, new_sliced_pair, sliced_delta)
from vlm_lora.lora.inject import register_layer_type

QKV = ("q", "k", "v")
OUT_SUFFIX = "base_layer.out_proj"


class _OutProjLora(nn.Module):
    """Container so the out_proj pairs are named ``out_proj_lora.lora_A.<name>.weight`` [r, E] / ``lora_B`` [E, r]."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()


class LoraMultiheadAttention(LoraLayer):
    """Per adapter: ``lora_A[name]`` ``nn.Linear(E, n * r)`` and ``lora_B[name]`` ``BlockLoraB`` [n, E, r]
    for the n adapted q/k/v slices; ``out_proj_lora.lora_A[name]`` / ``lora_B[name]`` for ``o``."""

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, spec: AdapterSpec):
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"LoraMultiheadAttention wraps nn.MultiheadAttention, got {type(base_layer).__name__}")
        if not base_layer._qkv_same_embed_dim or base_layer.in_proj_weight is None:
            raise ValueError("LoraMultiheadAttention needs the fused in_proj_weight (kdim == vdim == embed_dim)")
        if base_layer.bias_k is not None or base_layer.add_zero_attn:
            raise NotImplementedError("LoraMultiheadAttention does not support add_bias_kv or add_zero_attn")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.out_proj_lora = _OutProjLora()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.positions: dict[str, list[int]] = {}  # adapted q/k/v slices, as row blocks of in_proj_weight
        self.add_adapter(adapter_name, spec)

    @property
    def embed_dim(self) -> int:
        return self.base_layer.embed_dim

    @property
    def num_heads(self) -> int:
        return self.base_layer.num_heads

    @property
    def batch_first(self) -> bool:
        return self.base_layer.batch_first

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if tuple(s for s in spec.slice_order if s != "o") != QKV:
            raise ValueError(f"slice_order of a MultiheadAttention must be ('q', 'k', 'v', 'o'), "
                             f"got {spec.slice_order!r}")
        if not spec.slices or len(set(spec.slices)) != len(spec.slices) or not set(spec.slices) <= {*QKV, "o"}:
            raise ValueError(f"slices must be distinct names from ('q', 'k', 'v', 'o'), got {spec.slices!r}")
        variant = check_variant(spec)
        dim, mha = self.embed_dim, self.base_layer
        positions = sorted(QKV.index(s) for s in spec.slices if s != "o")
        scaling = lora_scaling(spec.rank, spec.alpha, spec.rslora)
        if positions:
            self.lora_A[name], self.lora_B[name], scaling = new_sliced_pair(
                spec, len(positions), dim, dim, mha.in_proj_weight)
        if "o" in spec.slices:
            weight = mha.out_proj.weight
            device = adapter_device(weight)
            lora_a = nn.Linear(dim, spec.rank, bias=False, device=device, dtype=weight.dtype)
            lora_b = nn.Linear(spec.rank, dim, bias=False, device=device, dtype=weight.dtype)
            variant.init_weights(lora_a, lora_b)
            self.out_proj_lora.lora_A[name], self.out_proj_lora.lora_B[name] = lora_a, lora_b
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self.positions[name] = positions
        self.specs[name] = spec
        self.active_adapters.append(name)

    # ---- projections -------------------------------------------------------------------------

    def _in_update(self, j: int, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """[..., E] update of adapter ``name`` on slice j (0=q, 1=k, 2=v) for x [..., E]; None if not adapted."""
        if j not in self.positions[name]:
            return None
        i, rank = self.positions[name].index(j), self.specs[name].rank
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        h = F.linear(self.lora_dropout[name](x.to(lora_a.dtype)), lora_a[i * rank:(i + 1) * rank])
        return F.linear(h, lora_b[i]) * self.scaling[name]

    def _qkv_update(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """[..., n, d] update of adapter ``name``'s adapted q/k/v slices (one A matmul); None if none."""
        if not self.positions[name]:
            return None
        lora_a = self.lora_A[name]
        return self.lora_B[name](lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]

    def _out_update(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """[..., E] update of adapter ``name`` on out_proj; None if ``o`` is not adapted."""
        if name not in self.out_proj_lora.lora_A:
            return None
        lora_a, lora_b = self.out_proj_lora.lora_A[name], self.out_proj_lora.lora_B[name]
        return lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]

    def _add_updates(self, x: torch.Tensor, out: torch.Tensor, names: list[str], update) -> torch.Tensor:
        """out plus ``update(name, x)`` of each adapter in ``names``, or per batch row under routing."""
        if self.routing is not None:
            return self.routed(x, out, lambda name, rows, out_rows: (
                delta if (delta := update(name, rows)) is not None else torch.zeros_like(out_rows)))
        for name in names:
            delta = update(name, x)
            if delta is not None:
                out = out + delta.to(out.dtype)
        return out

    def _in_proj(self, j: int, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Slice j (0=q, 1=k, 2=v) of the in-projection of x [..., E], with the adapters' updates."""
        mha, dim = self.base_layer, self.embed_dim
        bias = mha.in_proj_bias[j * dim:(j + 1) * dim] if mha.in_proj_bias is not None else None
        out = F.linear(x, mha.in_proj_weight[j * dim:(j + 1) * dim], bias)
        return self._add_updates(x, out, names, lambda name, rows: self._in_update(j, name, rows))

    def _qkv_self(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """[..., 3E] in-projection of x [..., E] for self-attention: one base matmul, one A matmul."""
        mha = self.base_layer
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        if self.routing is not None:
            return self.routed(x, qkv, lambda name, rows, out_rows: (
                full_width_update(out_rows, delta, self.positions[name])
                if (delta := self._qkv_update(name, rows)) is not None else torch.zeros_like(out_rows)))
        for name in names:
            delta = self._qkv_update(name, x)
            if delta is not None:
                qkv = add_slice_update(qkv, delta, self.positions[name])
        return qkv

    def _out_proj(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        out_proj = self.base_layer.out_proj
        return self._add_updates(x, F.linear(x, out_proj.weight, out_proj.bias), names, self._out_update)

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """nn.MultiheadAttention masks (bool: True = not allowed; float: added) as a float additive mask."""
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        return mask.to(dtype)

    def _attn_bias(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                   batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Broadcastable [B or 1, h or 1, L, S] additive mask, or None."""
        bias = None
        if attn_mask is not None:
            bias = self._additive(attn_mask, dtype)
            if bias.dim() == 2:  # [L, S]
                bias = bias[None, None]
            elif bias.dim() == 3:  # [B * h, L, S]
                bias = bias.view(batch, self.num_heads, *bias.shape[1:])
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        if key_padding_mask is not None:  # [B, S]
            pad = self._additive(key_padding_mask, dtype)[:, None, None, :]
            bias = pad if bias is None else bias + pad
        return bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """Same signature and result as ``nn.MultiheadAttention.forward``: query [L, B, E] ([B, L, E] when
        batch_first, [L, E] unbatched), key/value [S, B, E] -> (output like query, None)."""
        names = self.unmerged_active()
        if not names and self.routing is None:
            return self.base_layer(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if need_weights:
            raise NotImplementedError("LoraMultiheadAttention computes attention with scaled_dot_product_attention "
                                      "and cannot return attention weights; call it with need_weights=False")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        self_attn = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:  # [L, E] -> [1, L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        if self_attn:
            q, k, v = self._qkv_self(query, names).chunk(3, dim=-1)
        else:
            q, k, v = (self._in_proj(j, t, names) for j, t in enumerate((query, key, value)))
        batch, heads = q.shape[0], self.num_heads
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, h, L|S, E/h]
        bias = self._attn_bias(attn_mask, key_padding_mask, batch, q.dtype)
        dropout = self.base_layer.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        out = self._out_proj(attn.transpose(1, 2).flatten(-2), names)  # [B, L, E]

        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    # ---- merge and PEFT format ---------------------------------------------------------------

    def delta_weight(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """fp32 updates (in_proj [3E, E] with zero rows for un-adapted slices, out_proj [E, E]); None if absent."""
        in_delta = out_delta = None
        dim = self.embed_dim
        if self.positions[name]:
            blocks = sliced_delta(self.lora_A[name], self.lora_B[name], self.scaling[name])
            in_delta = blocks.new_zeros(3 * dim, dim)
            for i, pos in enumerate(self.positions[name]):
                in_delta[pos * dim:(pos + 1) * dim] = blocks[i]
        if name in self.out_proj_lora.lora_A:
            lora_a, lora_b = self.out_proj_lora.lora_A[name], self.out_proj_lora.lora_B[name]
            out_delta = (lora_b.weight.float() @ lora_a.weight.float()) * self.scaling[name]
        return in_delta, out_delta

    def _merge_adapter(self, name: str, sign: float) -> None:
        mha = self.base_layer
        if self.positions[name]:
            blocks = sliced_delta(self.lora_A[name], self.lora_B[name], self.scaling[name])
            merge_slice_rows(mha.in_proj_weight, blocks, self.positions[name], sign)
        _, out_delta = self.delta_weight(name)
        if out_delta is not None:
            merge_slice_rows(mha.out_proj.weight, out_delta[None], [0], sign)

    def peft_export(self, name: str) -> list[PeftEntry]:
        """PEFT pairs: ``""`` (in_proj, rank n * r) and ``"base_layer.out_proj"`` (padded to the same rank)."""
        spec, positions = self.specs[name], self.positions[name]
        entries = []
        rank = len(positions) * spec.rank if positions else spec.rank
        alpha = self.scaling[name] * rank  # PEFT's alpha / rank equals our scaling (rsLoRA included)
        if positions:
            lora_a, lora_b = export_blocks(self.lora_A[name], self.lora_B[name], positions, len(QKV))
            entries.append(PeftEntry("", lora_a, lora_b, rank, alpha))
        if name in self.out_proj_lora.lora_A:
            a, b = self.out_proj_lora.lora_A[name].weight.detach(), self.out_proj_lora.lora_B[name].weight.detach()
            lora_a, lora_b = a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)
            lora_a[:spec.rank], lora_b[:, :spec.rank] = a, b
            entries.append(PeftEntry(OUT_SUFFIX, lora_a, lora_b, rank, alpha))
        return entries

    @torch.no_grad()
    def load_peft(self, name: str, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Inverse of :meth:`peft_export`; also takes ``"out_proj"`` for the out pair. A pair for a part this
        adapter does not have must have a zero product (PEFT's untouched B); ValueError otherwise."""
        if any(len(pair) > 2 and pair[2] is not None for pair in entries.values()):
            raise ValueError("a DoRA magnitude vector cannot be loaded into per-slice LoRA")
        entries = {suffix: tuple(pair[:2]) for suffix, pair in entries.items()}  # (lora_A, lora_B)
        unknown = set(entries) - {"", OUT_SUFFIX, "out_proj"}
        if unknown or {OUT_SUFFIX, "out_proj"} <= set(entries):
            raise ValueError(f"unexpected PEFT suffixes {sorted(entries)} for a MultiheadAttention; "
                             f"expected '' and {OUT_SUFFIX!r}")
        spec, positions = self.specs[name], self.positions[name]
        in_pair = entries.get("")
        out_pair = entries.get(OUT_SUFFIX, entries.get("out_proj"))
        if positions and in_pair is None:
            raise ValueError(f"adapter {name!r} adapts {spec.slices} but the PEFT pair for in_proj ('') is missing")
        if not positions and in_pair is not None and torch.count_nonzero(in_pair[1].float() @ in_pair[0].float()):
            raise ValueError(f"adapter {name!r} has no q/k/v slice but the PEFT in_proj pair is non-zero")
        if "o" in spec.slices:  # check the out pair before anything is copied
            if out_pair is None:
                raise ValueError(f"adapter {name!r} adapts 'o' but the PEFT pair {OUT_SUFFIX!r} is missing")
            peft_a, peft_b = out_pair
            r, dim = spec.rank, self.embed_dim
            if peft_a.dim() != 2 or peft_a.shape[0] < r or peft_a.shape[1] != dim \
                    or tuple(peft_b.shape) != (dim, peft_a.shape[0]):
                raise ValueError(f"PEFT out_proj pair has lora_A {tuple(peft_a.shape)}, lora_B "
                                 f"{tuple(peft_b.shape)}; expected [R, {dim}] and [{dim}, R] with R >= rank {r}")
            if torch.count_nonzero(peft_b[:, r:].float() @ peft_a[r:].float()):
                raise ValueError(f"PEFT out_proj pair has rank beyond {r} in use (non-zero product of the "
                                 f"padding); it cannot be loaded as a rank-{r} adapter")
        elif out_pair is not None and torch.count_nonzero(out_pair[1].float() @ out_pair[0].float()):
            raise ValueError(f"adapter {name!r} has no 'o' slice but the PEFT out_proj pair is non-zero")
        if positions:
            import_blocks(self.lora_A[name], self.lora_B[name], positions, len(QKV), *in_pair)
        if "o" in spec.slices:
            self.out_proj_lora.lora_A[name].weight.copy_(peft_a[:r])
            self.out_proj_lora.lora_B[name].weight.copy_(peft_b[:, :r])

    def extra_repr(self) -> str:
        adapters = {n: (s.rank, s.slices) for n, s in self.specs.items()}
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, adapters={adapters}"


register_layer_type(lambda m, s: isinstance(m, nn.MultiheadAttention), LoraMultiheadAttention)
