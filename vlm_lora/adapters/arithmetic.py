"""Adapter arithmetic on dense deltas, and re-factoring a merged delta into a LoRA pair.

Every method acts on the deltas ``D_i = s_i B_i A_i`` (or ``W_i - W_base`` for fully-trained
tensors), never on A and B separately, because ``B A = (B G)(G^-1 A)`` for any invertible G:
factor-level rules (PEFT's ``linear``/``ties`` on A and B) depend on an arbitrary choice.

Methods (``w_i`` weights, ``density`` the kept fraction):

* ``linear``, ``cat``, ``svd``: ``sum_i w_i D_i`` (they differ only in how the result is re-factored);
* ``magnitude_prune``: ``sum_i w_i trim(D_i)``, trim keeping the ``int(density * numel)`` entries of
  largest magnitude;
* ``dare_linear``: ``sum_i w_i dare(D_i)``, dare = Bernoulli(``density``) mask rescaled by 1/density;
* ``ties`` / ``dare_ties`` (mergekit's task-vector rule, sign consensus "sum", normalised): prune each
  D_i (trim / dare), elect ``sign(sum_i w_i D_i')`` per entry (0 counts as +), keep the entries whose
  weighted sign agrees, ``sum_i w_i D_i' [agrees] / sum_i w_i [agrees]`` (divisor 0 -> 1);
* ``slerp`` (two deltas, ``t``): per tensor, spherical interpolation of the flattened tensors, lerp when
  ``|cos| > 0.9995`` (mergekit's ``slerp``).

Re-factoring: :func:`svd_factors` (dense, truncated SVD), :func:`qr_svd_factors` (the same result for
linear merges from the stacked factors alone: QR of each stack plus an SVD of the small core, no
[out, in] matrix), :func:`cat_factors` (exact, rank = sum of ranks).
"""

from __future__ import annotations

import math

import torch

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "slerp")
LINEAR_METHODS = ("linear", "cat", "svd")  # the merged delta is the weighted sum: factors suffice
PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SLERP_DOT_THRESHOLD = 0.9995


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if keep:
        mask[delta.abs().flatten().topk(keep).indices] = True
    return delta * mask.view(delta.shape)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Random drop: keep each entry with probability ``density`` and rescale by 1 / density.

    Draws one ``torch.bernoulli`` of ``delta``'s shape from ``generator`` (even at density 1, so the
    random stream does not depend on the densities)."""
    mask = torch.bernoulli(torch.full(delta.shape, float(density), device=delta.device), generator=generator)
    return delta * mask / density if density < 1 else delta


def sign_consensus(pruned: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES: ``sum w_i D_i [sign(w_i D_i) = elected] / sum w_i [agrees]``, elected = sign of the weighted sum."""
    weighted = torch.stack([w * d for w, d in zip(weights, pruned)])  # [n, ...]
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agrees = (weighted.sign() == elected).to(weighted.dtype)
    w = torch.tensor(weights, dtype=weighted.dtype, device=weighted.device).view(-1, *[1] * (weighted.dim() - 1))
    divisor = (w * agrees).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (weighted * agrees).sum(0) / divisor


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors (flattened), lerp when nearly colinear (mergekit's rule)."""
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def merge_deltas(deltas: list[torch.Tensor], weights: list[float], method: str, density: float = 1.0,
                 t: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge same-shaped fp32 deltas by ``method``; DARE draws its masks from ``generator`` in input order."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method in LINEAR_METHODS:
        return sum(w * d for w, d in zip(weights, deltas))
    if method == "slerp":
        if len(deltas) != 2:
            raise ValueError(f"slerp merges exactly two adapters, got {len(deltas)}")
        return slerp(t, deltas[0], deltas[1])
    if method in ("dare_linear", "dare_ties"):
        pruned = [dare(d, density, generator) for d in deltas]
    else:
        pruned = [magnitude_trim(d, density) for d in deltas]
    if method in ("ties", "dare_ties"):
        return sign_consensus(pruned, weights)
    return sum(w * d for w, d in zip(weights, pruned))


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    """(B [out, k], A [k, in], relative Frobenius error of dropping singular values beyond k)."""
    total = s.pow(2).sum()
    dropped = s[rank:].pow(2).sum()
    error = float((dropped / total).sqrt()) if total > 0 else 0.0
    return u[:, :rank] * s[:rank], vh[:rank], error


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` pair for a dense delta [out, in] (Eckart-Young): (B, A, relative error)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _truncate(u, s, vh, rank)


def qr_svd_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                   rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The truncated SVD of ``sum w_i B_i A_i`` from the factors (B_i [out, r_i] scaled, A_i [r_i, in]).

    ``B_c = [w_1 B_1 ... w_n B_n] = Q_B R_B``, ``A_c^T = [A_1; ...; A_n]^T = Q_A R_A``; the SVD of the
    R x R core ``R_B R_A^T = U S V^T`` gives ``B' = Q_B U_k S_k``, ``A' = (Q_A V_k)^T``.
    Costs O((out + in) R^2 + R^3) with R = sum r_i, and never forms the [out, in] delta.
    """
    b_stack = torch.cat([w * b.float() for w, (b, _) in zip(weights, factors)], dim=1)  # [out, R]
    a_stack = torch.cat([a.float() for _, a in factors], dim=0)  # [R, in]
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_stack.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    b, a, error = _truncate(u, s, vh, rank)
    return q_b @ b, a @ q_a.T, error


def cat_factors(factors: list[tuple[torch.Tensor, torch.Tensor]],
                weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact pair of rank sum r_i: ``B' = [w_1 B_1 ... w_n B_n]``, ``A' = [A_1; ...; A_n]``."""
    return (torch.cat([w * b.float() for w, (b, _) in zip(weights, factors)], dim=1),
            torch.cat([a.float() for _, a in factors], dim=0))
