"""Host time of AdaLoRA's per-step hooks (orthogonality gradient, importance averages, budget masks).

224 adapted linears, LLaVA-7B's count, with small shapes so that the figure is the hooks' Python and
launch overhead, not their arithmetic: ``python bench/adalora_hooks.py``.
"""

import statistics
import time

import torch
from torch import nn

from vlm_lora.lora import AdapterSpec, inject_lora
from vlm_lora.lora.adalora import add_orthogonality_grad, allocate


def main(n_layers: int = 224, steps: int = 11) -> None:
    torch.set_num_threads(1)
    layers = nn.ModuleList([nn.Linear(64, 64 if i % 7 < 4 else 96) for i in range(n_layers)])  # two shapes
    budget = (("target_r", 8), ("tinit", 0), ("tfinal", 0), ("delta_t", 1))
    spec = AdapterSpec(rank=16, alpha=32, variant="adalora", extra=budget)
    inject_lora(layers, {str(i): spec for i in range(n_layers)})
    for name, param in layers.named_parameters():
        if "lora_" in name:
            param.grad = torch.randn_like(param)
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        add_orthogonality_grad(layers, step, 1000)
        allocate(layers, step, 1000)
        times.append(time.perf_counter() - start)
    print(f"{n_layers} layers: median {statistics.median(times) * 1e3:.1f} ms per step (hooks only)")


if __name__ == "__main__":
    main()
