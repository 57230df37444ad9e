"""BLIP-2 and InstructBLIP in transformers 5: EVA ViT with a fused ``qkv``, Q-Former, linear connector,
and an OPT (decoder-only) or flan-T5 (encoder-decoder) language model. No ``model.`` wrapper:

- vision encoder ``vision_model.encoder.layers.{i}.self_attn.qkv`` (FUSED q, k, v),
  ``.self_attn.projection``, ``.mlp.fc1/fc2``; patch embedding ``vision_model.embeddings.patch_embedding``
- cross-attention ``qformer.encoder.layer.{i}.crossattention.attention.{query,key,value}``,
  ``.crossattention.output.dense``; only in layers ``i % cross_attention_frequency == 0``
- Q-Former (the rest): ``qformer.encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``.attention.output.dense``, FFN ``.intermediate_query.dense`` / ``.output_query.dense``,
  ``qformer.layernorm`` (BLIP-2) or ``qformer.embeddings`` (InstructBLIP), and ``query_tokens``,
  a top-level ``nn.Parameter``
- connector ``language_projection``; lm head ``language_model.lm_head``
- OPT: ``language_model.model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``.fc1``, ``.fc2``
- T5: ``language_model.{encoder,decoder}.block.{i}.layer.{j}.{SelfAttention,EncDecAttention}.{q,k,v,o}``,
  ``.DenseReluDense.{wi_0,wi_1,wo}`` (gated FFN of flan-T5, which all BLIP-2 T5 checkpoints use).
  The T5 "language decoder" component is the whole encoder-decoder LM.

The Q-Former is split between two components that never share a module: ``cross_attention`` owns the
``crossattention`` sub-blocks, ``qformer`` everything else. Prefixes cannot contain wildcards, so both
list their per-layer prefixes for layers 0..31 (absent layers are skipped by the planner).

OPT and T5 need separate entries (one short name maps to one leaf). Both match the same model class,
so ``detect_architecture`` returns ``blip2_opt`` for either until detection can look at the
``language_model`` class; ``blip2_t5`` is registered for explicit use.
"""

from vlm_lora.architectures.registry import Architecture, ComponentMap, register

_MAX_QFORMER_LAYERS = 32  # BLIP-2 / InstructBLIP Q-Formers have 12

_VISION = ComponentMap(
    ("vision_model",),
    {"q": "self_attn.qkv", "k": "self_attn.qkv", "v": "self_attn.qkv", "o": "self_attn.projection",
     "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    fused={"self_attn.qkv": ("q", "k", "v")},
)
_CROSS_ATTENTION = ComponentMap(
    tuple(f"qformer.encoder.layer.{i}.crossattention" for i in range(_MAX_QFORMER_LAYERS)),
    {"q": "crossattention.attention.query", "k": "crossattention.attention.key",
     "v": "crossattention.attention.value", "o": "crossattention.output.dense"},
)
_QFORMER = ComponentMap(
    ("query_tokens", "qformer.layernorm", "qformer.embeddings")
    + tuple(f"qformer.encoder.layer.{i}.{block}" for i in range(_MAX_QFORMER_LAYERS)
            for block in ("attention", "intermediate_query", "output_query", "intermediate", "output")),
    {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
     "o": "attention.output.dense", "fc1": "intermediate_query.dense", "fc2": "output_query.dense"},
)
_CONNECTOR = ComponentMap(("language_projection",))
_LM_HEAD = ComponentMap(("language_model.lm_head",))

# OPT has no gate; its FFN is fc1 (up) -> ReLU -> fc2 (down), so up/down are aliases of fc1/fc2.
_OPT = ComponentMap(
    ("language_model.model",),
    {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
     "fc1": "fc1", "fc2": "fc2", "up": "fc1", "down": "fc2"},
)
# T5: the bare leaves q, k, v, o match self- and cross-attention (EncDecAttention) alike.
_T5 = ComponentMap(
    ("language_model.shared", "language_model.encoder", "language_model.decoder"),
    {"q": "q", "k": "k", "v": "v", "o": "o",
     "gate": "DenseReluDense.wi_0", "up": "DenseReluDense.wi_1", "down": "DenseReluDense.wo"},
)


def _blip2(name: str, language_decoder: ComponentMap, language_model: str) -> Architecture:
    return Architecture(
        name=name,
        model_classes=("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"),
        components={"vision_encoder": _VISION, "cross_attention": _CROSS_ATTENTION, "qformer": _QFORMER,
                    "connector": _CONNECTOR, "language_decoder": language_decoder, "lm_head": _LM_HEAD},
        never_adapted=("vision_model.embeddings.patch_embedding",),
        submodule_classes={"language_model": (language_model,)},
        fsdp_wrap_classes=("Blip2EncoderLayer", "Blip2QFormerLayer", "InstructBlipEncoderLayer",
                           "InstructBlipQFormerLayer", "OPTDecoderLayer", "T5Block"),
    )


register(_blip2("blip2_opt", _OPT, "OPTForCausalLM"))  # registered first: what detection returns for any BLIP-2 today
register(_blip2("blip2_t5", _T5, "T5ForConditionalGeneration"))
