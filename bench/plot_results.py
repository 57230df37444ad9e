"""Bar chart of a ``bench/lora_step.py`` output: step time (and, for a ``--profile-dir`` run, GPU kernel
time) and peak memory relative to each floor.

    python bench/plot_results.py bench/results_h200.jsonl bench/lora_step_h200.png
"""

from __future__ import annotations

import json
import sys


def main(results: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in open(results) if line.strip()]
    summary = lines[-1]
    ratios = summary["ratios"]
    groups = [("LoRA", "peft", "vlm_lora"), ("+ vision q/v", "peft_vision", "vlm_lora_vision"),
              ("DoRA", "peft_dora", "vlm_lora_dora"), ("grad. ckpt", "peft_gc", "vlm_lora_gc"),
              ("QLoRA NF4", "peft_qlora", "vlm_lora_qlora")]
    groups = [g for g in groups if g[1] in ratios and g[2] in ratios]
    panels = [("step_vs_floor", "step time / floor")]
    rows = {line["variant"]: line for line in lines if "variant" in line}
    if all("profile" in row for row in rows.values()):  # --profile-dir runs: GPU kernel time per step too
        floors = {"": "floor", "vision": "floor_vision", "gc": "floor_gc", "dora": "floor", "qlora": "floor"}
        for variant in ratios:
            kind = variant.split("_", 1)[1] if variant.startswith("peft_") else variant[len("vlm_lora_"):]
            floor = rows.get(floors.get(kind, "floor"))
            if floor:
                ratios[variant]["kernel_vs_floor"] = rows[variant]["profile"]["kernel_ms"] / floor["profile"]["kernel_ms"]
        panels.append(("kernel_vs_floor", "GPU kernel time / floor"))
    panels.append(("mem_vs_floor", "peak memory / floor"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), dpi=110)
    for ax, (key, title) in zip(axes, panels):
        xs = range(len(groups))
        peft = [ratios[g[1]].get(key, float("nan")) for g in groups]
        ours = [ratios[g[2]].get(key, float("nan")) for g in groups]
        ax.bar([x - 0.2 for x in xs], peft, width=0.4, label="PEFT", color="#bbbbbb")
        ax.bar([x + 0.2 for x in xs], ours, width=0.4, label="vlm-lora", color="#2a7ab9")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), [g[0] for g in groups], fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, max([v for v in peft + ours if v == v] + [1.2]) * 1.1)
        for x, v in zip(xs, ours):
            ax.text(x + 0.2, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
        for x, v in zip(xs, peft):
            ax.text(x - 0.2, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['preset']} shapes, batch {summary['batch']} x {summary['seq']} tokens, {summary['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
