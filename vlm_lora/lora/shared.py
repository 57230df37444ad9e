"""Sibling LoRA layers fed by the same tensor (q/k/v, gate/up) share one A projection.

Their A matrices are applied as one matmul ``x [A_q; A_k; A_v]^T`` the first time any of them
sees ``x``; the others take their slice of that result. In backward this is one GEMM for all
the A gradients and one for the input gradient, instead of one each per layer, and ``x`` is
read once. Which leaves share an input is architecture data (``ComponentMap.shared_inputs``).

Each member knows its own position (``shared_position``, an int) rather than being looked up by object
identity: ``torch.compile`` then traces every decoder layer to the same graph (an ``id()`` lookup made
it guard on each layer object, one recompile per layer until the cache limit sent the rest to eager).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora.linear import LoraLinear


class _SharedLowRankInput(torch.autograd.Function):
    """``x [A_1; ...; A_m]^T`` split into the members' [N, r] inputs, as one node.

    Through autograd (cat, cast, matmul, one slice per member) backward zero-filled an [N, m r] buffer
    per member and handed each A a view of one gradient, which the optimizer's gradient then had to
    copy; here backward is two GEMMs and each A gets a fresh fp32 gradient. Same arithmetic."""

    @staticmethod
    def forward(ctx, x2, *weights):
        """x2 [N, in] in the compute dtype; weights: m fp32 [r, in] -> m outputs [N, r]."""
        stacked = torch.cat(weights).to(x2.dtype)  # [m r, in]
        hidden = x2 @ stacked.T  # [N, m r]
        ctx.save_for_backward(x2, stacked)
        ctx.weight_dtypes = [w.dtype for w in weights]
        return hidden.split(weights[0].shape[0], dim=1)

    @staticmethod
    def backward(ctx, *grads):
        x2, stacked = ctx.saved_tensors
        rank = stacked.shape[0] // len(grads)
        grad_hidden = torch.cat([g if g is not None else x2.new_zeros(x2.shape[0], rank) for g in grads], dim=1)
        grad_x = grad_hidden @ stacked if ctx.needs_input_grad[0] else None
        grad_stacked = grad_hidden.T @ x2  # [m r, in]
        grad_weights = [part.to(dtype) if needed else None for part, dtype, needed in
                        zip(grad_stacked.split(rank), ctx.weight_dtypes, ctx.needs_input_grad[1:])]
        return grad_x, *grad_weights


class SharedInputGroup:
    """Links LoRA layers that are always called with the same input tensor."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        for position, layer in enumerate(layers):
            layer.shared_position = position
        self._input: torch.Tensor | None = None
        self._adapter: str | None = None
        self._hidden: torch.Tensor | None = None
        self._pending: set[int] = set()

    def hidden(self, layer: nn.Module, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x A_layer^T`` [N, r] for ``layer``, from one shared matmul over all members."""
        position = layer.shared_position
        if self._input is not x or self._adapter != name or position not in self._pending:
            weights = [member.lora_A[name].weight for member in self.layers]
            self._hidden = _SharedLowRankInput.apply(x.reshape(-1, x.shape[-1]).to(dtype), *weights)
            self._input, self._adapter = x, name
            self._pending = set(range(len(self.layers)))
        self._pending.discard(position)
        hidden = self._hidden[position]
        if not self._pending:  # every member has its slice: drop the references
            self._input = self._hidden = None
        return hidden

    def eligible(self, name: str) -> bool:
        """All members carry plain LoRA ``name`` with one rank and no dropout."""
        specs = [getattr(m, "specs", {}).get(name) for m in self.layers]
        return (all(s is not None and s.variant in ("lora", "lora_fa") for s in specs)
                and len({s.rank for s in specs}) == 1
                and all(isinstance(m.lora_dropout[name], nn.Identity) for m in self.layers)
                and all(name not in m.merged_adapters for m in self.layers))


def link_shared_inputs(model: nn.Module, groups: list[tuple[str, ...]]) -> int:
    """Group LoRA layers ``<parent>.<leaf>`` for each leaf tuple in ``groups``; returns how many groups."""
    modules = dict(model.named_modules())
    count = 0
    for leaves in groups:
        first = leaves[0]
        for path, module in modules.items():
            if not (isinstance(module, LoraLinear) and path.endswith("." + first)):
                continue
            parent = path[: -len(first)]
            members = [modules.get(parent + leaf) for leaf in leaves]
            members = [m for m in members if isinstance(m, LoraLinear)]
            if len(members) < 2:
                continue
            group = SharedInputGroup(members)
            for member in members:
                member.shared_group = group
            count += 1
    return count
