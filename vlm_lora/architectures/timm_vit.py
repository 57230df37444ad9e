"""timm ``VisionTransformer``: ``blocks.{i}.attn.qkv`` (FUSED q, k, v), ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc1/fc2``; patch embedding ``patch_embed.proj`` (Conv2d), never adapted.

A classifier has no connector in the VLM sense, but its ``head`` plays the connector's role (vision
features -> outputs) and, like a connector, is trained in full by every strategy that has one; so
``vision_only`` = LoRA on the blocks + trained head. ``cls_token``, ``pos_embed`` and the final ``norm`` /
``fc_norm`` belong to no component and stay frozen. Matched by class name, so torchvision's class of the
same name would match too (its paths differ: plans then fail with "no nn.Linear matched").
"""

from vlm_lora.architectures.registry import Architecture, ComponentMap, register

register(Architecture(
    name="timm_vit",
    model_classes=("VisionTransformer",),
    components={
        "vision_encoder": ComponentMap(
            ("blocks",),
            {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
            fused={"attn.qkv": ("q", "k", "v")},
        ),
        "connector": ComponentMap(("head",)),
    },
    never_adapted=("patch_embed.proj",),
    task="classify",
    fsdp_wrap_classes=("Block",),
))
