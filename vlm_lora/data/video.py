"""Videos for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision: a folder of frames or a video file each.

Rows name them as ``vlm_lora.data.video_rows`` reads (``"video": path``, video parts, ``<video>``).
A video is a folder of PNG/JPEG frames (sorted by name; the source rate is the row's ``video_fps``,
default ``DEFAULT_SOURCE_FPS``) or a video file decoded with PyAV (``pip install av``) or, with
torchvision before 0.24, ``torchvision.io.read_video``.

Frames are sampled when a sample is collated. Qwen-VL: ``fps`` frames per second of the source, at
most ``max_frames``, evenly spaced, their count a multiple of the processor's ``temporal_patch_size``
(the last frame repeated for a shorter clip); the processor resizes every frame by its own rule
(``smart_resize`` with factor ``patch_size * merge_size``, within ``max_pixels`` per frame; Qwen3-VL's
caps the clip's frames x area with it)
LLaVA-OneVision: ``max_frames`` (default 8) evenly spaced frames, resized to its fixed size. The
options (``data.video``) live on the processor's video processor, so they are saved with it.

In a user turn, images come first, then videos, then the text; a sample may mix both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["VideoClip", "VideoRef", "DEFAULT_SOURCE_FPS", "VIDEO_PROCESSORS", "check_video", "load_clip", "media_batch",
           "sample_indices", "set_video_options", "video_options"]

DEFAULT_SOURCE_FPS = 2.0
DEFAULT_FPS = 2.0
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_MARKER = "<video>"
# processors that take ``videos=`` with the layout handled here, and how their frames are sampled: "rate" (Qwen-VL:
# ``fps`` per second, at most ``max_frames``, a multiple of the temporal patch) or "fixed" (LLaVA-OneVision:
# ``max_frames`` evenly spaced, so that the clips of a batch stack into one [B, frames, C, H, W])
VIDEO_PROCESSORS = {"Qwen2VLProcessor": "rate", "Qwen2_5_VLProcessor": "rate", "Qwen3VLProcessor": "rate",
                    "LlavaOnevisionProcessor": "fixed"}
FIXED_FRAMES = 8  # "fixed" families' frames per video unless data.video.max_frames says otherwise


@dataclass(frozen=True)
class VideoRef:
    """A row's video, not yet read: a frames folder or a video file, and the source rate the row declares."""

    path: Path
    fps: float | None = None  # the row's ``video_fps``; None: a file's own rate, a folder's DEFAULT_SOURCE_FPS


@dataclass
class VideoClip:
    """Sampled frames of one video: ``frames`` (PIL, all one size) at ``indices`` of a ``total``-frame source
    running at ``source_fps``."""

    frames: list
    source_fps: float
    indices: list[int]
    total: int
    source: Path | None = None

    @property
    def size(self) -> tuple:
        """(``"video"``, frames, width, height, source fps, total, indices): what the processor's expansion
        depends on."""
        return ("video", len(self.frames), *self.frames[0].size, self.source_fps, self.total, tuple(self.indices))

    def metadata(self):
        """transformers' ``VideoMetadata``: the processors take the sampled rate (temporal positions) from it."""
        from transformers.video_utils import VideoMetadata

        width, height = self.frames[0].size
        return VideoMetadata(total_num_frames=self.total, fps=self.source_fps, frames_indices=list(self.indices),
                             width=width, height=height, duration=self.total / self.source_fps)


def blank_clip(size: tuple) -> VideoClip:
    """A black clip of a ``VideoClip.size`` (to measure what the processor adds for it)."""
    _, n, width, height, source_fps, total, indices = size
    return VideoClip([Image.new("RGB", (width, height))] * n, source_fps, list(indices), total)


def check_video(ref: VideoRef) -> str | None:
    """Why the video cannot be read (a missing path, a folder without frames, no decoder), else None."""
    if ref.path.is_dir():
        return None if _frame_files(ref.path) else f"video folder {ref.path} holds no {'/'.join(FRAME_SUFFIXES)} frames"
    if not ref.path.is_file():
        return f"video not found: {ref.path}"
    return _decoder_problem(ref.path)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def _decoder_problem(path: Path) -> str | None:
    if _video_decoder() is not None:
        return None
    return (f"cannot decode video file {path}: no video decoder is installed (pip install av; or give the video as a "
            "folder of PNG/JPEG frames)")


def _video_decoder() -> str | None:
    """``"av"`` (PyAV), ``"torchvision"`` (``torchvision.io.read_video``, removed in torchvision 0.24), or None."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("av"):
        return "av"
    try:  # the version, not an import: importing torchvision takes seconds
        major, minor = (int(part) for part in importlib.metadata.version("torchvision").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    return "torchvision" if (major, minor) < (0, 24) else None


# ---------------------------------------------------------------- frames

def sample_indices(total: int, source_fps: float, fps: float, max_frames: int, multiple: int = 2) -> list[int]:
    """Indices of the frames to keep: ``fps`` per second of a ``total``-frame source at ``source_fps``, at most
    ``max_frames``, evenly spaced (first and last kept), a multiple of ``multiple`` frames (the last repeated
    when the source has fewer)."""
    wanted = round(total / source_fps * fps)
    n = max(multiple, min(wanted, max_frames, total) // multiple * multiple)
    if n <= total:
        return [round(i * (total - 1) / (n - 1)) if n > 1 else 0 for i in range(n)]
    return list(range(total)) + [total - 1] * (n - total)


def frame_indices(total: int, source_fps: float, processor) -> list[int]:
    """The frames kept of a ``total``-frame source by the processor's rule (``VIDEO_PROCESSORS``)."""
    fps, max_frames = video_options(processor)
    if VIDEO_PROCESSORS.get(type(processor).__name__) == "fixed":
        return [round(i * (total - 1) / (max_frames - 1)) if max_frames > 1 else 0 for i in range(max_frames)]
    multiple = int(getattr(processor.video_processor, "temporal_patch_size", 1) or 1)
    return sample_indices(total, source_fps, fps, max_frames, multiple)


def load_clip(ref: VideoRef, processor, where: str = "") -> VideoClip:
    """The sampled frames of ``ref`` under the processor's video options (``video_options``)."""
    from vlm_lora.data.formats import DataError

    where = f"{where}: " if where else ""
    problem = check_video(ref)
    if problem:
        raise DataError(where + problem)
    try:
        if ref.path.is_dir():
            files = _frame_files(ref.path)
            source_fps, total = ref.fps or DEFAULT_SOURCE_FPS, len(files)
            indices = frame_indices(total, source_fps, processor)
            frames = [_read_frame(files[i]) for i in indices]
        else:
            frames, source_fps, indices, total = _decode(ref.path, ref.fps, lambda n, fps: frame_indices(n, fps, processor))
    except Exception as error:  # PIL and the decoders raise many kinds on bad files
        raise DataError(f"{where}cannot read video {ref.path}: {error}") from None
    if not frames or len({frame.size for frame in frames}) > 1:
        raise DataError(f"{where}video {ref.path}: {'frames differ in size' if frames else 'no frames decoded'}")
    return VideoClip(frames, source_fps, indices, total, ref.path)


def _read_frame(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _decode(path: Path, fps: float | None, pick) -> tuple[list[Image.Image], float, list[int], int]:
    """(the frames ``pick(frame count, fps)`` chooses as RGB PIL, the source fps (``fps`` if given), their indices,
    the frame count) of a video file, with PyAV (only the picked frames are kept) or torchvision."""
    if _video_decoder() == "torchvision":
        from torchvision.io import read_video

        video, _, info = read_video(str(path), pts_unit="sec", output_format="THWC")
        fps = fps or float(info.get("video_fps") or DEFAULT_SOURCE_FPS)
        indices = pick(len(video), fps)
        return [Image.fromarray(video[i].numpy()) for i in indices], fps, indices, len(video)
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = fps or float(stream.average_rate or DEFAULT_SOURCE_FPS)
        if not stream.frames:  # the container does not say: decode all, then pick
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
            indices = pick(len(frames), fps)
            return [frames[i] for i in indices], fps, indices, len(frames)
        indices = pick(stream.frames, fps)
        wanted, kept = set(indices), {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_image().convert("RGB")
        if not kept:
            return [], fps, indices, stream.frames
        indices = [min(i, max(kept)) for i in indices]  # the header may count more frames than there are
        return [kept[i] for i in indices], fps, indices, stream.frames


# ---------------------------------------------------------------- the processor

def supports_video(processor) -> bool:
    return type(processor).__name__ in VIDEO_PROCESSORS and getattr(processor, "video_processor", None) is not None


def video_options(processor) -> tuple[float, int]:
    """(fps, max_frames) set on the processor's video processor (``set_video_options``), else the defaults."""
    video = getattr(processor, "video_processor", None)
    fps = getattr(video, "vlm_lora_fps", None) or DEFAULT_FPS
    fixed = VIDEO_PROCESSORS.get(type(processor).__name__) == "fixed"
    return float(fps), int(getattr(video, "max_frames", None) or (FIXED_FRAMES if fixed else 768))


def set_video_options(processor, fps: float | None = None, max_frames: int | None = None,
                      max_pixels: int | None = None) -> None:
    """``data.video`` onto the video processor (saved with it): the sampling rate and cap, pixels per frame."""
    video = processor.video_processor
    if fps is not None:
        video.vlm_lora_fps = fps
    if max_frames is not None:
        video.max_frames = max_frames
    if max_pixels is not None:
        size = video.size
        low = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        video.size = {"shortest_edge": min(low or max_pixels, max_pixels), "longest_edge": max_pixels}


def refuse_video(processor, example) -> bool:
    """Whether ``example`` has videos; a ``DataError`` naming it and the family if the processor takes none."""
    from vlm_lora.data.formats import DataError

    if not getattr(example, "videos", None):
        return False
    if not supports_video(processor):
        where = getattr(example, "where", "") or f"row {example.row}"
        raise DataError(f"{where}: a video sample, but {type(processor).__name__} takes no videos here; video "
                        f"is supported for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision (remove the video rows)")
    return True


def media_sizes(example, image_sizes: list, processor) -> list:
    """Sizes of one sample's images and clips in placeholder order (clips read to know their frames)."""
    refuse_video(processor, example)
    return order_media(example, image_sizes, [load_clip(v, processor, example.where).size for v in example.videos])


def load_media(items: list, processor, where: str = "") -> list:
    """``items`` (images, ``VideoRef``s, clips) with every ``VideoRef`` read into a ``VideoClip``."""
    return [load_clip(item, processor, where) if isinstance(item, VideoRef) else item for item in items]


def processor_kwargs(items: list, nested: bool) -> dict:
    """``images=`` / ``videos=`` + ``video_metadata=`` for one sample's media (``nested``: images as [[...]])."""
    images = [item for item in items if not isinstance(item, VideoClip)]
    clips = [item for item in items if isinstance(item, VideoClip)]
    kwargs = {}
    if images:
        kwargs["images"] = [images] if nested else images
    if clips:
        kwargs.update(videos=[clip.frames for clip in clips], video_metadata=[clip.metadata() for clip in clips],
                      do_sample_frames=False)  # sampled here already (Qwen3-VL's processor samples by default)
    return kwargs


def media_batch(processor, items: list, texts: list[str], device, dtype) -> dict:
    """The processor's generation batch (left padding is the caller's) for ``items``: each an image, or one
    sample's list of images and videos; pixels cast to ``dtype`` and moved to ``device``."""
    per_sample = [load_media(item if isinstance(item, list) else [item], processor) for item in items]
    if any(isinstance(m, VideoClip) for sample in per_sample for m in sample):
        flat = [m for sample in per_sample for m in sample]
        batch = processor(text=texts, return_tensors="pt", padding=True, **processor_kwargs(flat, nested=False))
    else:  # one list per prompt: processors that take several images per sample read a flat list as the first's
        batch = processor(images=per_sample, text=texts, return_tensors="pt", padding=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    return batch


def video_prompts(processor, examples, texts: list[str], users: list[str], chat_template: str | None = None) -> list[str]:
    """``texts`` (rendered generation prompts) with each video sample's own: its conversation with ``users[i]``
    as the last user turn, its videos and images in their turns, then the assistant cue."""
    if not any(getattr(e, "videos", None) for e in examples):
        return texts
    from dataclasses import replace

    from vlm_lora.data.collate import ChatCollator

    collator = ChatCollator(processor, chat_template=chat_template)
    out = list(texts)
    for i, example in enumerate(examples):
        if refuse_video(processor, example):
            asked = replace(example, turns=[*example.turns[:-1], (users[i], example.turns[-1][1])])
            out[i] = collator.render(asked)[-2]
    return out


def shown_path(example) -> str:
    """The picture a prediction row names: the sample's image, else its first video's first frame (a folder) or
    the video file."""
    if getattr(example, "image_path", None) is not None or not getattr(example, "videos", None):
        return str(example.image_path)
    video = example.videos[0].path
    frames = _frame_files(video) if video.is_dir() else []
    return str(frames[0] if frames else video)


def media_turns(example, n_turns: int) -> list[tuple[int, int]]:
    """(images, videos) each user turn shows."""
    images = list(getattr(example, "image_turns", None) or [1] + [0] * (n_turns - 1))
    videos = list(getattr(example, "video_turns", None) or [0] * n_turns)
    return list(zip(images, videos))


def order_media(example, images: list, videos: list) -> list:
    """One sample's images and videos in the order the placeholders appear: per turn, its images then its videos."""
    images, videos, ordered = iter(images), iter(videos), []
    for n_images, n_videos in media_turns(example, len(example.turns)):
        ordered += [next(images) for _ in range(n_images)] + [next(videos) for _ in range(n_videos)]
    return ordered


def media_turn(text: str, n_images: int, n_videos: int) -> dict:
    """A chat-template user turn: image placeholders, video placeholders, then ``text``."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}

