"""Qwen2-VL and Qwen2.5-VL in transformers 5: a ViT with a FUSED ``attn.qkv`` (dynamic resolution,
flattened patches), a patch merger and a Qwen2 decoder.

- vision encoder ``model.visual.blocks.{i}.attn.qkv`` (fused q, k, v: per-slice LoRA, q and v by default),
  ``.attn.proj``; MLP ``.mlp.fc1/fc2`` (Qwen2-VL) or ``.mlp.{gate,up,down}_proj`` (Qwen2.5-VL);
  patch embedding ``model.visual.patch_embed.proj`` (Conv3d over 2 frames), never adapted
- connector ``model.visual.merger`` (``ln_q``, ``mlp.0``, ``mlp.2``): 2 x 2 patches -> one LM token. It sits
  inside ``model.visual``, so the vision encoder owns ``patch_embed`` and ``blocks`` only.
- language decoder ``model.language_model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``
- rope: multi-axis ("mrope") positions per token, (temporal, height, width), built by ``mrope_positions``
"""

from functools import partial

import torch

from vlm_lora.architectures.registry import (ATTN_QKV, LLAMA_TARGETS, MLP_GATE_UP, Architecture, ComponentMap,
                                             register)

VISION_ATTENTION = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj"}
FUSED_QKV = {"attn.qkv": ("q", "k", "v")}
VISION_PREFIXES = ("model.visual.patch_embed", "model.visual.blocks")
LANGUAGE_DECODER = ComponentMap(("model.language_model",), LLAMA_TARGETS, shared_inputs=(ATTN_QKV, MLP_GATE_UP))
PATCH_EMBEDDING = ("model.visual.patch_embed.proj",)


def mrope_positions(batch: dict, image_token_id: int, spatial_merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL's (temporal, height, width) rope positions of each sample of a padded image batch.

    batch: ``input_ids`` [B, T], ``attention_mask`` [B, T], ``image_grid_thw`` [n_images, 3] (patches per
    image, images in sample order). Per sample, over its real tokens: text tokens take consecutive positions
    from a running ``current`` (the same on all 3 axes); an image's tokens (t * h * w / merge^2, a grid
    t x h/merge x w/merge in row-major order) take ``current`` + (frame, row, column), then ``current`` grows
    by max(h, w) / merge. Padding gets 0. Returns positions [3, B, T] and the number of images of each
    sample [B]. The same positions as the model's own ``get_rope_index`` for images (videos, whose temporal
    axis is scaled by time, are not handled).
    """
    ids, keep = batch["input_ids"], batch["attention_mask"].bool()
    grids = batch.get("image_grid_thw")
    grids = grids.tolist() if grids is not None else []
    positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    images_per_sample, image = [], 0
    for b in range(ids.shape[0]):
        flags, counts = torch.unique_consecutive(ids[b][keep[b]] == image_token_id, return_counts=True)
        pieces, current, first = [], 0, image
        for is_image, count in zip(flags.tolist(), counts.tolist()):
            if not is_image:
                pieces.append(torch.arange(current, current + count).expand(3, -1))
                current += count
                continue
            while count > 0:  # a run of image tokens: one image, or several back to back
                if image >= len(grids):
                    raise ValueError(f"sample {b} has more image tokens than image_grid_thw has images ({len(grids)})")
                t, h, w = grids[image][0], grids[image][1] // spatial_merge_size, grids[image][2] // spatial_merge_size
                frame, row, column = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pieces.append(torch.stack([frame, row, column]).reshape(3, -1) + current)
                current += max(h, w)
                count -= t * h * w
                image += 1
            if count < 0:
                raise ValueError(f"sample {b}: its image tokens do not match the image sizes in image_grid_thw")
        positions[:, b, keep[b]] = torch.cat(pieces, 1)
        images_per_sample.append(image - first)
    return positions, torch.tensor(images_per_sample)


def packing_rope_positions(config) -> partial:
    """``mrope_positions`` with the image token id and merge size of a Qwen-VL model ``config`` (it pickles)."""
    return partial(mrope_positions, image_token_id=config.image_token_id,
                   spatial_merge_size=config.vision_config.spatial_merge_size)


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
        rope_positions=packing_rope_positions,
        dynamic_resolution=True,
    )


register(_qwen_vl("qwen2_vl", "Qwen2VLForConditionalGeneration", {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}, (),
                  ("Qwen2VLVisionBlock", "Qwen2VLDecoderLayer")))
register(_qwen_vl("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                  {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}, (MLP_GATE_UP,),
                  ("Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer")))
