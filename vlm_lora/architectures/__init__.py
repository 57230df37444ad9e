"""Architecture knowledge as data: the registry mechanism and one entry per model family.

``registry`` holds ``Architecture`` / ``ComponentMap`` and ``detect_architecture``; each other
module registers one family (module-path prefixes per component, target names, fused layouts).
``tiny_models`` builds small random-init models of the registered families for tests and recipes.
May import torch and transformers only; every other subpackage may import it. Importing this
package registers the built-in entries.
"""

from vlm_lora.architectures import blip2, llava, open_clip, timm_vit  # noqa: F401
