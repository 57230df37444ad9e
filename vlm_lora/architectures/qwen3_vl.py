"""Qwen3-VL (dense) and Qwen3-VL-MoE in transformers 5: Qwen2.5-VL's fused-qkv ViT with learnt position
embeddings, a final merger plus DeepStack mergers (features of intermediate vision blocks fed to the
first decoder layers), and a Qwen3 decoder.

- vision encoder ``model.visual.blocks.{i}.attn.qkv`` (fused q, k, v), ``.attn.proj``,
  ``.mlp.linear_fc1/linear_fc2``; ``model.visual.pos_embed``; patch embedding ``model.visual.patch_embed.proj``
  (Conv3d), never adapted
- connector ``model.visual.merger`` and ``model.visual.deepstack_merger_list.{i}`` (``linear_fc1/linear_fc2``),
  listed per index for i < 8 (absent ones are skipped)
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj`` and, dense,
  ``.mlp.{gate,up,down}_proj``. The MoE experts are fused 3-D parameters, not ``nn.Linear``: LoRA goes on
  the attention only (``full`` mode trains the experts and the router).
"""

from vlm_lora.architectures.qwen2_vl import (FUSED_QKV, LANGUAGE_DECODER, PATCH_EMBEDDING, VISION_ATTENTION,
                                             packing_rope_positions)
from vlm_lora.architectures.registry import ATTN_QKV, LLAMA_TARGETS, Architecture, ComponentMap, register

_ATTENTION_TARGETS = {t: LLAMA_TARGETS[t] for t in ("q", "k", "v", "o")}
# one prefix per DeepStack merger (PEFT's modules_to_save cannot hold the ModuleList itself); 3 in Qwen3-VL
_DEEPSTACK = tuple(f"model.visual.deepstack_merger_list.{i}" for i in range(8))
_FC = {"fc1": "linear_fc1", "fc2": "linear_fc2"}


def _qwen3_vl(name: str, model_class: str, decoder: ComponentMap, layers: tuple[str, str]) -> Architecture:
    return Architecture(
        name=name,
        model_classes=(model_class,),
        components={
            "vision_encoder": ComponentMap(
                ("model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks"),
                {**VISION_ATTENTION, "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}, FUSED_QKV),
            "connector": ComponentMap(("model.visual.merger",) + _DEEPSTACK, _FC),
            "language_decoder": decoder,
            "lm_head": ComponentMap(("lm_head",)),
        },
        never_adapted=PATCH_EMBEDDING,
        fsdp_wrap_classes=layers,
        rope_positions=packing_rope_positions,  # images: Qwen2-VL's positions
        dynamic_resolution=True,
    )


register(_qwen3_vl("qwen3_vl", "Qwen3VLForConditionalGeneration", LANGUAGE_DECODER,
                   ("Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer")))
register(_qwen3_vl("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration",
                   ComponentMap(("model.language_model",), _ATTENTION_TARGETS, shared_inputs=(ATTN_QKV,)),
                   ("Qwen3VLMoeVisionBlock", "Qwen3VLMoeTextDecoderLayer")))
