"""Qwen2-VL and Qwen2.5-VL in transformers 5: a ViT with a FUSED ``attn.qkv`` (dynamic resolution,
flattened patches), a patch merger and a Qwen2 decoder.

- vision encoder ``model.visual.blocks.{i}.attn.qkv`` (fused q, k, v: per-slice LoRA, q and v by default),
  ``.attn.proj``; MLP ``.mlp.fc1/fc2`` (Qwen2-VL) or ``.mlp.{gate,up,down}_proj`` (Qwen2.5-VL);
  patch embedding ``model.visual.patch_embed.proj`` (Conv3d over 2 frames), never adapted
- connector ``model.visual.merger`` (``ln_q``, ``mlp.0``, ``mlp.2``): 2 x 2 patches -> one LM token. It sits
  inside ``model.visual``, so the vision encoder owns ``patch_embed`` and ``blocks`` only.
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
"""

from vlm_lora.architectures.registry import (ATTN_QKV, LLAMA_TARGETS, MLP_GATE_UP, Architecture, ComponentMap,
                                             register)

VISION_ATTENTION = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj"}
FUSED_QKV = {"attn.qkv": ("q", "k", "v")}
VISION_PREFIXES = ("model.visual.patch_embed", "model.visual.blocks")
LANGUAGE_DECODER = ComponentMap(("model.language_model",), LLAMA_TARGETS, shared_inputs=(ATTN_QKV, MLP_GATE_UP))
PATCH_EMBEDDING = ("model.visual.patch_embed.proj",)


def _qwen_vl(name: str, model_class: str, vision_mlp: dict[str, str], shared: tuple, layers: tuple[str, str]):
    return Architecture(
        name=name,
        model_classes=(model_class,),
        components={
            "vision_encoder": ComponentMap(VISION_PREFIXES, {**VISION_ATTENTION, **vision_mlp}, FUSED_QKV, shared),
            "connector": ComponentMap(("model.visual.merger",), {"fc1": "mlp.0", "fc2": "mlp.2"}),
            "language_decoder": LANGUAGE_DECODER,
            "lm_head": ComponentMap(("lm_head",)),
        },
        never_adapted=PATCH_EMBEDDING,
        fsdp_wrap_classes=layers,
    )


register(_qwen_vl("qwen2_vl", "Qwen2VLForConditionalGeneration", {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}, (),
                  ("Qwen2VLVisionBlock", "Qwen2VLDecoderLayer")))
register(_qwen_vl("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                  {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}, (MLP_GATE_UP,),
                  ("Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer")))
