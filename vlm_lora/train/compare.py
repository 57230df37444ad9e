"""``vlm-lora compare``: train one recipe with several LoRA variants for the same number of steps
on the same data and put them side by side: trainable parameters, memory, step time and the
eval metric, as ``compare.md`` / ``compare.json`` and one plot, ``compare.png``.

Every component the recipe trains with LoRA gets the variant; everything else (data, ranks,
learning rate, seed) stays as the recipe says. Memory is the CUDA peak when training on a GPU; on
CPU it is not measured (the column says so) and only the training state is given, 16 bytes per
trainable parameter (fp32 weight, gradient and two AdamW moments).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch

from vlm_lora.policy import STRATEGIES, Variant
from vlm_lora.recipe import Recipe, RecipeError, validate_recipe
from vlm_lora.train.loop import finetune

log = logging.getLogger("vlm_lora")
VARIANTS = Variant.__args__


def lora_components(recipe: Recipe) -> list[str]:
    """Components the recipe trains with LoRA (strategy defaults, then the recipe's overrides)."""
    modes = {name: policy.mode for name, policy in STRATEGIES[recipe.strategy].modes.items()}
    modes.update({name: policy.mode for name, policy in recipe.components.items() if policy.mode})
    return [name for name, mode in modes.items() if mode == "lora"]


def variant_recipe(recipe: Recipe, variant: str, steps: int, out_dir: Path) -> Recipe:
    data = recipe.model_dump()
    for name in lora_components(recipe):
        data["components"].setdefault(name, {})["variant"] = variant
    data["train"].update(max_steps=steps, log_steps=1, eval_steps=None, save_steps=None, eval_base=False)
    data["output_dir"] = str(out_dir / variant)
    return validate_recipe(data)


def compare_variants(recipe: Recipe, variants: list[str], steps: int, out_dir: str | Path) -> list[dict]:
    """Train each variant for ``steps`` optimizer steps; returns one row per variant."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise RecipeError(f"--variants: unknown {', '.join(bad)}; valid: {', '.join(VARIANTS)}")
    if not lora_components(recipe):
        raise RecipeError(f"compare: strategy {recipe.strategy!r} trains no component with LoRA")
    out_dir = Path(out_dir)
    rows = []
    for variant in variants:
        run = variant_recipe(recipe, variant, steps, out_dir)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        results = finetune(run, overwrite=True)
        rows.append(_row(variant, Path(run.output_dir), results, run,
                         torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None))
        log.info("compare %s: %s", variant, rows[-1])
    write_table(rows, out_dir)
    plot_comparison(rows, out_dir / "compare.png")
    return rows


def _row(variant: str, run_dir: Path, results: dict, recipe: Recipe, peak_mb: float | None) -> dict:
    plan = (run_dir / "plan.txt").read_text().splitlines()
    trainable = int(next(line for line in plan if line.startswith("total")).split()[1].replace(",", ""))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    samples = recipe.train.batch_size * recipe.train.grad_accum
    step_times = [samples / m["samples_per_s"] for m in metrics if m.get("samples_per_s")][1:]  # first: warm-up
    adapted = results.get("adapted", {})
    preferred = (recipe.train.metric_for_best, "cider", "accuracy")
    metric = next((k for k in preferred if k and k in adapted), None)
    return {"variant": variant, "trainable_params": trainable, "peak_memory_mb": peak_mb,
            "train_state_mb": trainable * 16 / 2 ** 20,
            "step_time_s": statistics.median(step_times) if step_times else None,
            "final_loss": next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
            "metric": metric, "eval": adapted.get(metric) if metric else None}


def write_table(rows: list[dict], out_dir: Path) -> Path:
    fmt = lambda value, spec: "not measured (CPU)" if value is None else format(value, spec)  # noqa: E731
    lines = ["| variant | trainable params | peak memory (MB) | train state (MB) | step time (s) | final loss | eval |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        evaluation = f"{r['metric']} {r['eval']:.4f}" if r["eval"] is not None else "no eval data"
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {fmt(r['peak_memory_mb'], '.0f')} | "
                     f"{r['train_state_mb']:.2f} | {fmt(r['step_time_s'], '.3f')} | {fmt(r['final_loss'], '.4f')} | "
                     f"{evaluation} |")
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    path = out_dir / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def plot_comparison(rows: list[dict], out_file: Path) -> Path:
    """Four bar panels, one bar per variant: params, memory, step time, eval metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    memory_key = "peak_memory_mb" if all(r["peak_memory_mb"] is not None for r in rows) else "train_state_mb"
    panels = [("trainable_params", "trainable params"),
              (memory_key, "peak memory (MB)" if memory_key == "peak_memory_mb" else "train state (MB, CPU run)"),
              ("step_time_s", "step time (s)"), ("eval", rows[0]["metric"] or "eval")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), dpi=100)
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r[key] or 0 for r in rows], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return out_file
