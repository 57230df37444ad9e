"""A recipe's pixel budget (``data.min_pixels``, ``max_pixels``, ``max_total_pixels``) on the model's processor.

Only dynamic-resolution families take one (registry field ``dynamic_resolution``); the others resize
every image to a fixed size, and a budget for them is refused by name. ``image_token_line`` says
what the budget costs: the image tokens per training sample that result.
"""

from __future__ import annotations

from vlm_lora.data.pixels import PixelBudget, set_processor_pixels

PIXEL_KEYS = ("min_pixels", "max_pixels", "max_total_pixels")


def pixel_settings(data) -> dict[str, int]:
    """The budget keys a recipe's ``data`` sets."""
    return {key: getattr(data, key) for key in PIXEL_KEYS if getattr(data, key, None)}


def video_settings(data) -> dict:
    """``{"video": {fps, max_frames, max_pixels}}`` when the recipe sets ``data.video`` (for ``vlm_lora.json``), else {}."""
    video = getattr(data, "video", None)
    return {"video": video.model_dump(exclude_none=True)} if video is not None and video.model_fields_set else {}


def apply_pixel_budget(recipe, model, processor) -> dict[str, int]:
    """Set ``data.min_pixels`` / ``max_pixels`` on ``processor`` (saved with it from then on); returns the
    budget keys set. Raises ``TrainingError`` for a family without dynamic resolution or min above max."""
    from vlm_lora.architectures.registry import REGISTRY, detect_architecture
    from vlm_lora.train.setup import TrainingError

    apply_video_options(recipe, processor)
    settings = pixel_settings(recipe.data)
    if not settings:
        return settings
    arch = detect_architecture(model)
    if not arch.dynamic_resolution:
        families = ", ".join(name for name, entry in REGISTRY.items() if entry.dynamic_resolution)
        keys = ", ".join(f"data.{key}" for key in settings)
        raise TrainingError(f"{keys}: pixel budgets apply to dynamic-resolution families ({families}); "
                            f"{arch.name} resizes every image to a fixed size; remove {keys}")
    low, high = set_processor_pixels(processor, recipe.data.min_pixels, recipe.data.max_pixels)
    if low > high:
        raise TrainingError(f"data.min_pixels {low} is above data.max_pixels {high}")
    return settings


def apply_video_options(recipe, processor) -> None:
    """``data.video`` onto a video-taking processor (``vlm_lora.data.video``); set for another family it is refused."""
    from vlm_lora.data.video import VIDEO_PROCESSORS, set_video_options, supports_video
    from vlm_lora.train.setup import TrainingError

    video, name = getattr(recipe.data, "video", None), type(processor).__name__
    if video is None:
        return
    if supports_video(processor) and video.max_pixels and VIDEO_PROCESSORS[name] == "fixed":
        raise TrainingError(f"data.video.max_pixels: {name} resizes every frame to a fixed size; remove it")
    if supports_video(processor):
        set_video_options(processor, video.fps, video.max_frames, video.max_pixels)
    elif video != type(video)():  # set to anything but the defaults (a re-validated dump sets every field)
        raise TrainingError(f"data.video: {name} takes no videos here (video is supported for Qwen2-VL, Qwen2.5-VL, "
                            "Qwen3-VL and LLaVA-OneVision); remove data.video")


def image_token_line(recipe, processor, dataset) -> str:
    """``image tokens per sample ...: min, mean, max`` over ``dataset``'s samples (their checked image sizes)."""
    from vlm_lora.data.pixels import image_sizes

    budget = PixelBudget.of(processor, recipe.data.max_total_pixels)
    counts = [budget.tokens(image_sizes(example)) for example in dataset.examples]
    total = f", at most {budget.max_total_pixels} per sample" if budget.max_total_pixels else ""
    return (f"image tokens per sample ({len(counts)} samples of {recipe.data.train}; pixels per image "
            f"{budget.min_pixels} to {budget.max_pixels}{total}): min {min(counts)}, "
            f"mean {sum(counts) / len(counts):.1f}, max {max(counts)}")


def report_image_tokens(recipe, processor, dataset=None) -> str | None:
    """With a pixel budget set: ``image_token_line`` over the training set (loaded if not given), else None."""
    if not pixel_settings(recipe.data):
        return None
    if dataset is None:
        from vlm_lora.train.setup import _load_data

        dataset = _load_data(recipe, recipe.data.train, streaming=False)
    return image_token_line(recipe, processor, dataset)
