"""open_clip ``CLIP`` / ``CustomTextCLIP`` (ViT towers built from ``ResidualAttentionBlock``).

- vision encoder ``visual.transformer.resblocks.{i}.attn`` (``nn.MultiheadAttention``: fused ``in_proj``
  q, k, v plus ``out_proj`` as slice ``o``), ``.mlp.c_fc`` / ``.mlp.c_proj``; patch embedding ``visual.conv1``
- connector ``visual.proj``, an ``nn.Parameter`` [width, embed_dim] (image features -> joint space)
- "language decoder": the text tower's blocks, ``transformer.resblocks.{i}`` (CLIP) or
  ``text.transformer.resblocks.{i}`` (CustomTextCLIP). It is a text ENCODER (causal mask, pooled at EOT),
  named ``language_decoder`` only because that is the registry's component for the language side.

Embeddings, ``ln_pre`` / ``ln_post`` / ``ln_final``, ``text_projection`` and ``logit_scale`` belong to no
component and stay frozen. Blocks built with ``scaled_cosine_attn`` / ``scale_heads`` use open_clip's own
``Attention`` instead of ``nn.MultiheadAttention`` and are not supported.
"""

from vlm_lora.architectures.registry import Architecture, ComponentMap, register

_BLOCK = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
_MHA = {"attn": ("q", "k", "v", "o")}

register(Architecture(
    name="open_clip",
    model_classes=("CLIP", "CustomTextCLIP"),
    components={
        "vision_encoder": ComponentMap(("visual.transformer",), _BLOCK, _MHA),
        "connector": ComponentMap(("visual.proj",)),
        # up/down alias fc1/fc2 (there is no gate), as for the OPT decoder of BLIP-2
        "language_decoder": ComponentMap(("transformer", "text.transformer"),
                                         {**_BLOCK, "up": "mlp.c_fc", "down": "mlp.c_proj"}, _MHA),
    },
    never_adapted=("visual.conv1",),
    task="contrastive",
    fsdp_wrap_classes=("ResidualAttentionBlock",),
))
