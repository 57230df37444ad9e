"""Evaluate adapters with the pixel budget they were trained with (``"processor"`` in their ``vlm_lora.json``)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("vlm_lora")


def use_adapter_pixels(processor, adapter_dirs: list) -> dict:
    """Set the adapters' saved ``min_pixels`` / ``max_pixels`` (and ``data.video`` settings) on ``processor``;
    returns the pixel budget ({} if none).

    Adapters trained with different budgets cannot share one processor: ``AdapterError`` says to compare
    them in separate runs."""
    from vlm_lora.adapters.peft_format import AdapterError, read_meta
    from vlm_lora.data.pixels import set_processor_pixels

    budgets = {str(d): {k: v for k, v in (read_meta(d).get("processor") or {}).items()
                        if k in ("min_pixels", "max_pixels")} for d in adapter_dirs}
    distinct = {tuple(sorted(b.items())) for b in budgets.values()}
    if len(distinct) > 1:
        raise AdapterError(f"the adapters were trained with different pixel budgets {budgets}; evaluate them in "
                           f"separate runs")
    videos = {str(d): (read_meta(d).get("processor") or {}).get("video") for d in adapter_dirs}
    if len({json.dumps(v, sort_keys=True) for v in videos.values()}) > 1:
        raise AdapterError(f"the adapters were trained with different data.video settings {videos}; evaluate them "
                           "in separate runs")
    if adapter_dirs and videos[str(adapter_dirs[0])]:
        from vlm_lora.data.video import set_video_options

        set_video_options(processor, **videos[str(adapter_dirs[0])])
    budget = budgets[str(adapter_dirs[0])] if adapter_dirs else {}
    if budget:
        low, high = set_processor_pixels(processor, budget.get("min_pixels"), budget.get("max_pixels"))
        log.info("pixel budget of the adapters: %d to %d pixels per image", low, high)
    return budget
