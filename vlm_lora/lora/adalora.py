"""AdaLoRA (Zhang et al. 2023): the update in SVD form, pruned to a budget by importance.

    y = W x + s P diag(λ) Q x,   s = alpha / (r_init + 1e-5)      (PEFT's SVDLinear, exactly)

P [out, r] is ``lora_B``, Q [r, in] ``lora_A`` and λ [r, 1] ``lora_E`` (PEFT's names and
init: P, Q ~ N(0, 0.02), λ = 0). Training adds the orthogonality regularizer
``w * mean over P, Q of ||P^T P - I||_F, ||Q Q^T - I||_F`` and, after each optimizer step, the
budget schedule of PEFT's ``RankAllocator``: importance I = |θ ∇θ| smoothed (β1) with its
uncertainty (β2); a triplet's score is s(λ_i) + mean s(Q_i·) + mean s(P_·i); the budget falls
cubically from the sum of initial ranks at ``tinit`` to ``target_r`` per module at
``total - tfinal``; the lowest-scoring triplets get λ_i = 0 (masked; kept at 0 afterwards).
The final per-module ranks are ``final_ranks(model)`` (the plan's ``rank_pattern``).

Differences from PEFT's trainer integration: the regularizer's gradient is added just before
the optimizer step (after gradient clipping) instead of through the loss, and the importance
averages are not part of checkpoints (a resumed run restarts them).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora.base import TRAINABLE_KEYS, LoraLayer, PeftEntry
from vlm_lora.lora.hooks import BEFORE_STEP, STEP_HOOKS
from vlm_lora.lora.inject import iter_lora_layers
from vlm_lora.lora.variants import VARIANTS, LoraVariant

DEFAULTS = {"target_r": 4, "tinit": 0, "tfinal": 0, "delta_t": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.5}


def options(layer: LoraLayer, name: str) -> dict:
    """The AdaLoRA settings of an adapter (``AdapterSpec.extra`` over :data:`DEFAULTS`)."""
    return {**DEFAULTS, **dict(layer.specs[name].extra)}


class AdaLoraVariant(LoraVariant):
    """SVD-form LoRA: ``lora_A`` = Q, ``lora_B`` = P, ``lora_E`` = λ; ``adalora_mask[name]`` [r] bool."""

    name = "adalora"
    peft_type = "ADALORA"

    def create(self, layer: LoraLayer, name: str) -> None:
        if not hasattr(layer, "lora_E"):
            layer.lora_E = nn.ParameterDict()
            layer.adalora_mask, layer.adalora_scores = {}, {}
        rank = layer.specs[name].rank
        weight_a = layer.lora_A[name].weight
        with torch.no_grad():
            nn.init.normal_(weight_a, std=0.02)
            nn.init.normal_(layer.lora_B[name].weight, std=0.02)
        layer.lora_E[name] = nn.Parameter(torch.zeros(rank, 1, device=weight_a.device))
        layer.adalora_mask[name] = torch.ones(rank, dtype=torch.bool, device=weight_a.device)
        layer.scaling[name] = layer.specs[name].alpha / (rank + 1e-5)

    def linear_forward(self, layer: LoraLayer, name: str, x: torch.Tensor) -> None:
        return None

    def forward_delta(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = layer.lora_dropout[name](x)
        q_scaled = layer.lora_A[name].weight * layer.lora_E[name]  # [r, in]
        hidden = x @ q_scaled.to(x.dtype).T
        return (hidden @ layer.lora_B[name].weight.to(x.dtype).T) * layer.scaling[name]

    def add_to(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.forward_delta(layer, name, x, base_out).to(base_out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        q_scaled = layer.lora_A[name].weight.float() * layer.lora_E[name].float()
        return (layer.lora_B[name].weight.float() @ q_scaled) * layer.scaling[name]

    def kept(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """Indices of the triplets within the budget."""
        return layer.adalora_mask[name].nonzero().flatten()

    def peft_entries(self, layer: LoraLayer, name: str) -> list[PeftEntry]:
        """The kept triplets as a plain LoRA pair with scaling 1 (exact; for adapters mixing variants)."""
        kept = self.kept(layer, name)
        kept = kept if len(kept) else torch.zeros(1, dtype=torch.long)  # no rank left: a zero rank-1 pair
        lora_a = (layer.lora_A[name].weight.float() * layer.lora_E[name].float())[kept]
        lora_b = layer.lora_B[name].weight.float()[:, kept] * layer.scaling[name]
        if not layer.adalora_mask[name].any():
            lora_b = torch.zeros_like(lora_b)
        return [PeftEntry("", lora_a, lora_b, len(kept), float(len(kept)))]

    def native_tensors(self, layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
        """PEFT AdaLoRA tensors, pruned to the kept triplets as PEFT saves them."""
        kept = self.kept(layer, name)
        return {"lora_A": layer.lora_A[name].weight[kept], "lora_B": layer.lora_B[name].weight[:, kept],
                "lora_E": layer.lora_E[name][kept]}

    @staticmethod
    def param_count(in_features: int, out_features: int, rank: int) -> int:
        return rank * (in_features + out_features + 1)


def adalora_layers(model: nn.Module):
    for path, layer in iter_lora_layers(model):
        for name, variant in getattr(layer, "variants", {}).items():
            if variant.name == "adalora":
                yield path, layer, name


def final_ranks(model: nn.Module) -> dict[str, int]:
    """Module path -> number of triplets within the budget."""
    return {path: int(layer.adalora_mask[name].sum()) for path, layer, name in adalora_layers(model)}


def final_ranks_note(model: nn.Module) -> str:
    """The plan's lines after training: each AdaLoRA module's final rank ('' without AdaLoRA)."""
    ranks = final_ranks(model)
    if not ranks:
        return ""
    lines = [f"  {path}: {rank}" for path, rank in ranks.items()]
    return f"adalora final ranks (total {sum(ranks.values())} over {len(ranks)} modules):\n" + "\n".join(lines) + "\n"


def budget_schedule(step: int, total: int, init_budget: int, target_budget: int, opts: dict) -> tuple[int, bool]:
    """(budget, whether to mask now) at ``step``: PEFT's ``RankAllocator.budget_schedule``."""
    tinit, tfinal = opts["tinit"], opts["tfinal"]
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    progress = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * progress ** 3 + target_budget), step % opts["delta_t"] == 0


def orthogonality_loss(model: nn.Module, layers: list | None = None) -> torch.Tensor | None:
    """mean over every P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (PEFT's regularizer), or None.

    Layers with the same shapes are stacked and done in one batched matmul and norm: a 7B decoder has 224
    adapted linears of three shapes, and one small matmul, identity and norm each (plus their backward)
    made the step host-bound."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for _, layer, name in layers if layers is not None else adalora_layers(model):
        q, p = layer.lora_A[name].weight, layer.lora_B[name].weight  # Q [r, in], P [out, r]
        groups.setdefault((q.shape, p.shape, q.device, q.dtype), []).append((q, p))
    norms = []
    for pairs in groups.values():
        q = torch.stack([q for q, _ in pairs])  # [L, r, in]
        p = torch.stack([p for _, p in pairs])  # [L, out, r]
        for cov in (q @ q.transpose(1, 2), p.transpose(1, 2) @ p):  # [L, r, r]
            eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
            norms.append(torch.linalg.matrix_norm(cov - eye))  # [L]
    return torch.cat(norms).mean() if norms else None


def add_orthogonality_grad(model: nn.Module, step: int, total: int) -> None:
    """BEFORE_STEP hook: the regularizer's gradient (times ``orth_reg_weight``) into P's and Q's."""
    layers = list(adalora_layers(model))
    if not layers:
        return
    weight = options(layers[0][1], layers[0][2])["orth_reg_weight"]
    if weight == 0:
        return
    with torch.enable_grad():
        loss = orthogonality_loss(model, layers)
        params = [m for _, layer, name in layers for m in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
        grads = torch.autograd.grad(loss * weight, params)
    for param, grad in zip(params, grads):
        param.grad = grad if param.grad is None else param.grad + grad


def _triplet_scores(layers: list, update: bool, betas: tuple[float, float]) -> list[torch.Tensor]:
    """[r] score of each (P_i, λ_i, Q_i) of every layer; ``update``: fold this step's gradients into the
    averages first (PEFT's ``update_ipt``, same operations in the same order, as foreach ops over all
    layers at once: per tensor they were thousands of tiny kernels a step)."""
    pending = []  # (state, key, param) whose averages take this step's gradient
    for _, layer, name in layers:
        state = layer.adalora_scores.setdefault(name, {})
        for key, param in (("E", layer.lora_E[name]), ("A", layer.lora_A[name].weight),
                           ("B", layer.lora_B[name].weight)):
            if update or key not in state:
                if key not in state:
                    state[key] = (torch.zeros_like(param), torch.zeros_like(param))
                pending.append((state, key, param))
    if pending:
        avgs = [state[key][0] for state, key, _ in pending]
        uncs = [state[key][1] for state, key, _ in pending]
        importance = torch._foreach_mul([p.detach() for _, _, p in pending], [p.grad for _, _, p in pending])
        torch._foreach_abs_(importance)
        torch._foreach_mul_(avgs, betas[0])  # avg = b1 * avg + (1 - b1) * ipt
        torch._foreach_add_(avgs, torch._foreach_mul(importance, 1 - betas[0]))
        deviation = torch._foreach_sub(importance, avgs)  # unc = b2 * unc + (1 - b2) * |ipt - avg|
        torch._foreach_abs_(deviation)
        torch._foreach_mul_(deviation, 1 - betas[1])
        torch._foreach_mul_(uncs, betas[1])
        torch._foreach_add_(uncs, deviation)
    scores = []
    for _, layer, name in layers:
        score = {key: avg * unc for key, (avg, unc) in layer.adalora_scores[name].items()}
        scores.append(score["E"].view(-1) + score["A"].mean(1) + score["B"].mean(0))
    return scores


def allocate(model: nn.Module, steps_done: int, total: int) -> None:
    """STEP_HOOK: PEFT's ``update_and_allocate(global_step = steps_done - 1)``, after the optimizer step."""
    layers = list(adalora_layers(model))
    for _, layer, _ in layers:
        layer.adalora_total_steps = total  # PEFT's total_step, saved in the adapter config
    if not layers:
        return
    opts = options(layers[0][1], layers[0][2])
    if opts["tinit"] >= total - opts["tfinal"]:
        raise ValueError(f"adalora: tinit ({opts['tinit']}) + tfinal ({opts['tfinal']}) leave no steps for the "
                         f"budget schedule in this run of {total} steps; lower them or train longer")
    if steps_done == 0 or layers[0][1].lora_E[layers[0][2]].grad is None:
        return  # at attach time (no gradients yet)
    step = steps_done - 1
    final = total - opts["tfinal"]
    if step <= final:
        betas = (opts["beta1"], opts["beta2"])
        scores = _triplet_scores(layers, step < final, betas)
        init_budget = sum(layer.specs[name].rank for _, layer, name in layers)
        target_budget = sum(options(layer, name)["target_r"] for _, layer, name in layers)
        budget, mask_now = budget_schedule(step, total, init_budget, target_budget, opts)
        if not ((mask_now or step == final) and init_budget > budget):
            return
        threshold = torch.kthvalue(torch.cat(scores), init_budget - budget)[0]
        for (_, layer, name), score in zip(layers, scores):
            layer.adalora_mask[name] = score > threshold  # stays on the device: no host sync per layer
            if step == final:
                layer.adalora_scores.pop(name, None)
    with torch.no_grad():  # masking now, and at every step after the final allocation
        for _, layer, name in layers:
            mask = layer.adalora_mask[name].to(layer.lora_E[name].device)
            layer.lora_E[name].masked_fill_(~mask[:, None], 0.0)


VARIANTS["adalora"] = AdaLoraVariant
TRAINABLE_KEYS.append("lora_E")
BEFORE_STEP.append(add_orthogonality_grad)
STEP_HOOKS.append(allocate)
