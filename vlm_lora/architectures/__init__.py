"""Built-in architecture entries; importing this package registers them all."""

from vlm_lora.architectures import blip2, llava, open_clip, timm_vit  # noqa: F401
