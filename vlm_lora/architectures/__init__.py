"""Architecture knowledge as data: the registry mechanism and one entry per model family.

``registry`` holds ``Architecture`` / ``ComponentMap`` and ``detect_architecture``; each other
module registers one family (module-path prefixes per component, target names, fused layouts).
``tiny_models`` builds small random-init models of the registered families for tests and recipes.
May import torch and transformers only; every other subpackage may import it. Importing this
package registers the built-in entries.
"""

from vlm_lora.architectures import (blip2, gemma3, idefics3, internvl, llava, mllama, open_clip,  # noqa: F401
                                    paligemma, qwen2_vl, qwen3_vl, timm_vit)
