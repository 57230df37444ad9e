"""LoftQ in a run: initialise the planned ``init: loftq`` adapters before the base is quantized,
report the base's quantization error per component (Frobenius, before = plain QLoRA's
``||W - Q(W)||``, after = ``||W - Q_T - s B A||``), and record what a merge needs to rebuild
the LoftQ base (the adapter belongs to that base, not to the plain 4-bit one)."""

from __future__ import annotations

import logging
import math

from torch import nn

from vlm_lora.lora import AdapterSpec
from vlm_lora.lora.loftq import ITERATIONS, prepare_loftq
from vlm_lora.planner import Plan

log = logging.getLogger("vlm_lora")
NOTE = ("the base of this adapter is the LoftQ-initialised 4-bit base (Q_T, see error_after), not the plain "
        "quantized one; `vlm-lora merge` rebuilds it from the original base with these settings")


def run_loftq(model: nn.Module, plan: Plan, quant_type: str, double_quant: bool) -> dict | None:
    """LoftQ for every ``init: loftq`` target of ``plan``; the report is kept as ``model.loftq``
    (``save_adapter`` writes it to the sidecar) and returned. None without LoftQ targets."""
    specs = {path: spec for path, spec in plan.adapter_specs().items() if spec.init == "loftq"}
    if not specs:
        return None
    errors = prepare_loftq(model, specs, quant_type, double_quant)
    before, after = {}, {}
    for path, (err_before, err_after) in errors.items():
        component = plan.component_of_param(path) or "other"
        before[component] = before.get(component, 0.0) + err_before ** 2
        after[component] = after.get(component, 0.0) + err_after ** 2
    report = {"iterations": ITERATIONS, "quant_type": quant_type, "double_quant": double_quant,
              "error_before": {c: math.sqrt(v) for c, v in before.items()},
              "error_after": {c: math.sqrt(v) for c, v in after.items()},
              "modules": {path: [spec.rank, spec.alpha, spec.rslora] for path, spec in specs.items()}, "note": NOTE}
    for component in before:
        log.info("LoftQ %s (%d iterations): base quantization error (Frobenius) %.5g plain QLoRA -> %.5g with the "
                 "LoftQ adapter", component, ITERATIONS, report["error_before"][component],
                 report["error_after"][component])
    model.loftq = report
    return report


def rebuild_loftq_base(model: nn.Module, meta: dict) -> None:
    """Before quantizing for a merge: turn the original base into the LoftQ base the adapter was trained on."""
    report = meta.get("loftq")
    if not report:
        return
    specs = {path: AdapterSpec(rank=rank, alpha=alpha, rslora=rslora)
             for path, (rank, alpha, rslora) in report["modules"].items()}
    prepare_loftq(model, specs, report["quant_type"], report["double_quant"], report["iterations"], keep_init=False)
    log.info("rebuilt the LoftQ base of %d modules", len(specs))
