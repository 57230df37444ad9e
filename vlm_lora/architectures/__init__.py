"""Built-in architecture entries; importing this package registers them all."""

from vlm_lora.architectures import llava  # noqa: F401
