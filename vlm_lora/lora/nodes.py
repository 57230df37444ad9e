"""The LoRA linear's one-node autograd functions: base output and low-rank update in one node each.

Eager autograd pays host time and kernels per node: these fold the casts of the fp32 master weights,
the scaling and the add into the GEMMs (``addmm`` epilogues) and keep only what backward needs. Each
computes exactly what the plain chain of ops computes (tests compare the paths).
"""

from __future__ import annotations

from typing import Optional

import torch


def low_rank_plus_mm(small: torch.Tensor, small_w: torch.Tensor, big: torch.Tensor, big_w: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[bias +] small @ small_w + big @ big_w`` [N, out]: the small (low-rank) product is written first
    and the big GEMM adds into it in place (its epilogue), so the [N, out] result is written once.

    Under ``torch.compile`` it is one opaque op: Inductor would turn the in-place ``addmm_`` into an
    out-of-place ``addmm`` that first copies the [N, out] addend (a device-to-device copy per linear,
    about 3% of a compiled LLaVA-7B step). Both paths run the same kernels, so the bits are the same.
    """
    one_dtype = small.dtype == small_w.dtype == big.dtype == big_w.dtype and (bias is None or bias.dtype == big.dtype)
    if torch.compiler.is_compiling() and one_dtype:
        return torch.ops.vlm_lora.low_rank_plus_mm(small, small_w, big, big_w, bias)
    return _low_rank_then_mm(small, small_w, big, big_w, bias)


def _low_rank_then_mm(small, small_w, big, big_w, bias):
    low = torch.addmm(bias, small, small_w) if bias is not None else small @ small_w
    return low.addmm_(big, big_w)


@torch.library.custom_op("vlm_lora::low_rank_plus_mm", mutates_args=())
def _low_rank_plus_mm_op(small: torch.Tensor, small_w: torch.Tensor, big: torch.Tensor, big_w: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    with torch.autocast(big.device.type, enabled=False):  # one dtype in (checked by the caller), no casts
        return _low_rank_then_mm(small, small_w, big, big_w, bias)


@_low_rank_plus_mm_op.register_fake
def _(small, small_w, big, big_w, bias):
    return big.new_empty((big.shape[0], big_w.shape[1]))


class _AddLowRank(torch.autograd.Function):
    """``base_out + s (x A^T) B^T`` as one autograd node.

    Forward: one skinny GEMM for ``h = x A^T`` and one ``addmm`` that adds ``h (s B)^T`` into the
    base output in the GEMM epilogue (no separate scale or add pass over [tokens, out]).
    Backward: four GEMMs; saves only ``x`` (often already kept for a sibling layer) and the
    small ``h`` [tokens, r]. The fp32 master weights are cast to the activations' dtype here,
    and their gradients are returned in fp32.
    """

    @staticmethod
    def forward(ctx, base_out, x, weight_a, weight_b, scaling):
        dtype = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a = weight_a.to(dtype)
        b_scaled = (weight_b * scaling).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            h = x2 @ a.T  # [N, r]
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h, b_scaled.T)
        ctx.save_for_backward(x2, h, a, b_scaled)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.weight_dtypes = (weight_a.dtype, weight_b.dtype)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, h, a, b_scaled = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)
        grad_x = grad_a = grad_b = None
        with torch.autocast(g.device.type, enabled=False):
            grad_h = g @ b_scaled  # [N, r]
            if ctx.needs_input_grad[3]:
                grad_b = ((g.T @ h) * ctx.scaling).to(ctx.weight_dtypes[1])  # [out, r]
            if ctx.needs_input_grad[2]:
                grad_a = (grad_h.T @ x2).to(ctx.weight_dtypes[0])  # [r, in]
            if ctx.needs_input_grad[1]:
                grad_x = (grad_h @ a).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_out, grad_x, grad_a, grad_b, None


class _LinearPlusLowRank(torch.autograd.Function):
    """``y = x W^T + b + h (sB)^T`` for a frozen ``nn.Linear`` base, as one node.

    The low-rank product (plus bias) is computed first and the base GEMM adds it in its
    epilogue (``addmm``), so the [tokens, out] output is written once; backward computes
    ``g W`` for the input and the two small products for h and sB. ``h = x A^T`` [N, r] comes
    from ordinary autograd (or a shared-input group), so A's gradient flows as usual. B is scaled
    and cast to the activations' dtype here, not by autograd before the call: two nodes (a
    multiply and a cast, and their backward kernels) fewer per layer, with the same arithmetic.
    """

    @staticmethod
    def forward(ctx, x, hidden, weight, bias, weight_b, scaling, weight_a=None):
        """``hidden`` [N, r] from a shared-input group, or None with ``weight_a`` [r, in]: h = x A^T here."""
        x2 = x.reshape(-1, x.shape[-1])
        a = None
        if hidden is None:
            a = weight_a.to(x.dtype)
            hidden = x2 @ a.T
        b_scaled = (weight_b * scaling).to(x.dtype)  # [out, r]
        out = low_rank_plus_mm(hidden, b_scaled.T, x2, weight.T, bias)
        ctx.save_for_backward(hidden, weight, b_scaled, x2 if a is not None else None, a)
        ctx.x_shape, ctx.scaling, ctx.weight_b_dtype = x.shape, scaling, weight_b.dtype
        ctx.weight_a_dtype = weight_a.dtype if a is not None else None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, b_scaled, x2, a = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = g @ b_scaled if ctx.needs_input_grad[1] or a is not None else None
        # as autograd did it: the product in the activations' dtype, cast to B's, then scaled
        grad_b = (g.T @ hidden).to(ctx.weight_b_dtype) * ctx.scaling if ctx.needs_input_grad[4] else None
        grad_a = grad_x = None
        if a is not None:  # h = x A^T was computed here: its two products, as autograd's would be
            if ctx.needs_input_grad[6]:
                grad_a = (grad_hidden.T @ x2).to(ctx.weight_a_dtype)
            if ctx.needs_input_grad[0]:
                # the low-rank input gradient [N, in] is written first and the base GEMM adds into
                # it (addmm_ epilogue): no separate add pass over [N, in] per layer
                grad_x = low_rank_plus_mm(grad_hidden, a, g, weight).view(ctx.x_shape)
            grad_hidden = None
        elif ctx.needs_input_grad[0]:
            grad_x = (g @ weight).view(ctx.x_shape)
        return grad_x, grad_hidden, None, None, grad_b, None, grad_a


class _DoraLinear(torch.autograd.Function):
    """DoRA on a frozen ``nn.Linear``: ``y = (m / n) * (x W^T + s (x A^T) B^T) + b`` as one node.

    ``n`` [out] is the detached row norm of ``W + s B A``. Forward: the low-rank product is written
    first and the base GEMM adds into it (``addmm_``), then one scaling pass; ``z`` (the unscaled sum,
    [tokens, out]) is kept for the magnitude's gradient, like PEFT keeps the base output. Backward:
    one pass for ``g * m/n``, one for ``sum_t g z`` (dm), and GEMMs; the input gradient of the
    low-rank path is added in the base GEMM's epilogue. Weight gradients come back in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, magnitude, scaling, norm):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a, b_scaled = weight_a.to(dtype), (weight_b * scaling).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            hidden = x2 @ a.T  # [N, r]
            z = low_rank_plus_mm(hidden, b_scaled.T, x2, weight.T)  # [N, out]
            row_scale = (magnitude.float() / norm).to(dtype)  # [out]
            y = torch.addcmul(bias, z, row_scale) if bias is not None else z * row_scale
        ctx.save_for_backward(x2, hidden, z, weight, a, b_scaled, row_scale, norm)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        ctx.weight_dtypes = (weight_a.dtype, weight_b.dtype, magnitude.dtype)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, hidden, z, weight, a, b_scaled, row_scale, norm = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(z.dtype)
        grad_x = grad_a = grad_b = grad_m = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[5]:
                grad_m = ((g * z).sum(0, dtype=torch.float32) / norm).to(ctx.weight_dtypes[2])
            g_scaled = g * row_scale  # [N, out]
            grad_hidden = g_scaled @ b_scaled  # [N, r]
            if ctx.needs_input_grad[4]:
                grad_b = ((g_scaled.T @ hidden) * ctx.scaling).to(ctx.weight_dtypes[1])
            if ctx.needs_input_grad[3]:
                grad_a = (grad_hidden.T @ x2).to(ctx.weight_dtypes[0])
            if ctx.needs_input_grad[0]:
                grad_x = low_rank_plus_mm(grad_hidden, a, g_scaled, weight).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, grad_m, None, None
