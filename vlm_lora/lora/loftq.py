"""LoftQ (Li et al. 2023): initialise a QLoRA adapter so that 4-bit base + adapter is close to
the full-precision weight, by alternating quantization and SVD:

    R_0 = W;  for t = 1..T:  Q_t = deq(q(R_{t-1})),  (L_t, R'_t) = SVD_r(W - Q_t),  R_t = W - L_t R'_t

The base keeps Q_T (stored as R_{T-1}, whose 4-bit quantization *is* Q_T, so the usual 4-bit
layer holds it) and the adapter starts at s B A = L_T R'_T, with A = R'_T / sqrt(s),
B = L_T / sqrt(s) (PEFT's ``loftq_init`` ignores s; here any alpha works). q is the bitsandbytes
quantizer the run stores the base with (NF4/FP4, double quant as configured), so Q_T is
exactly what training sees.

:func:`prepare_loftq` runs before the base linears are quantized (``init: loftq`` needs
``model.quantization.bits: 4`` on the component) and leaves each layer's (A, B) for the
``loftq`` init. The LoftQ base is part of the result: the adapter reproduces the trained model
on that base only; ``vlm-lora merge`` rebuilds it from the original base (the sidecar records
the settings).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora.init import INITS
from vlm_lora.lora.variants import lora_scaling

ITERATIONS = 5  # T; the paper's NF4 runs use 1 to 5


def quantize_roundtrip(weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """deq(q(weight)) in fp32, with bitsandbytes' 4-bit quantizer (blocksize 64, as ``Params4bit``)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), quant_type=quant_type, compress_statistics=double_quant)
    return bnbf.dequantize_4bit(packed, state).float()


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, rank: int, scaling: float, quant_type: str = "nf4",
                    double_quant: bool = True, iterations: int = ITERATIONS) -> dict:
    """For weight [out, in]: ``stored`` (in weight's dtype; its 4-bit quantization is Q_T), ``lora_A``
    [r, in], ``lora_B`` [out, r] (fp32, with s B A = L R'), and the Frobenius errors
    ``before`` = ||W - deq(q(W))|| (plain QLoRA) and ``after`` = ||W - Q_T - s B A||."""
    target = weight.float()
    stored = weight
    quantized = quantize_roundtrip(stored.float().to(weight.dtype), quant_type, double_quant)
    before = torch.linalg.matrix_norm(target - quantized).item()
    for step in range(iterations):
        if step:
            stored = (target - low_rank).to(weight.dtype)
            quantized = quantize_roundtrip(stored, quant_type, double_quant)
        u, s, vh = torch.linalg.svd(target - quantized, full_matrices=False)
        root = torch.sqrt(s[:rank])
        left, right = u[:, :rank] * root, root[:, None] * vh[:rank]  # L [out, r], R' [r, in]
        low_rank = left @ right
    after = torch.linalg.matrix_norm(target - quantized - low_rank).item()
    factor = scaling ** -0.5
    return {"stored": stored, "lora_A": right * factor, "lora_B": left * factor, "before": before, "after": after}


def prepare_loftq(model: nn.Module, specs: dict, quant_type: str, double_quant: bool,
                  iterations: int = ITERATIONS, keep_init: bool = True) -> dict[str, tuple[float, float]]:
    """LoftQ for every ``nn.Linear`` path in ``specs`` (path -> AdapterSpec): its weight becomes the
    stored residual (quantize the model afterwards) and, with ``keep_init``, the (A, B) wait on the
    module for the ``loftq`` init. Returns path -> (error before, error after)."""
    errors = {}
    for path, spec in specs.items():
        module = model.get_submodule(path)
        if type(module) is not nn.Linear:
            raise ValueError(f"init loftq: {path} is a {type(module).__name__}, not a full-precision nn.Linear; "
                             f"LoftQ runs before the base is quantized")
        result = loftq_decompose(module.weight.data, spec.rank, lora_scaling(spec.rank, spec.alpha, spec.rslora),
                                 quant_type, double_quant, iterations)
        module.weight.data.copy_(result["stored"])
        if keep_init:
            module.loftq_init = (result["lora_A"], result["lora_B"])
        errors[path] = (result["before"], result["after"])
    return errors


@torch.no_grad()
def init_loftq(layer, name: str) -> None:
    """The ``loftq`` init: the (A, B) that :func:`prepare_loftq` left on the base layer."""
    pending = getattr(layer.base_layer, "loftq_init", None)
    if pending is None:
        raise ValueError("init loftq needs model.quantization.bits: 4 on this component: LoftQ initialises the "
                         "adapter while the base is quantized")
    lora_a, lora_b = pending
    layer.lora_A[name].weight.copy_(lora_a)
    layer.lora_B[name].weight.copy_(lora_b)
    del layer.base_layer.loftq_init


INITS["loftq"] = init_loftq
