"""Video rows: which rows name videos, and the ``Sample`` they become (``vlm_lora.data.video`` reads the frames).

A row names its video(s) with ``"video": path`` (or ``"videos": [...]``, and the source rate of a
frames folder as ``"video_fps"``); chat rows put a ``{"type": "video"}`` part (``"video"``/``"path"``
inline, else the next row-level video) or a ``<video>`` marker (also in LLaVA ``conversations``) in
the user turn that shows it; no marker: every video goes to the first turn. A row without images is
a sample with ``image_path`` None and no image in any turn.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlm_lora.data.video import VIDEO_MARKER, VideoRef

__all__ = ["attach_videos", "extract_videos", "has_video", "video_sample"]

NO_IMAGE = "<no image>"  # stands in for the image of a video-only row while its turns are read


def has_video(record: Any) -> bool:
    """Whether a row names a video (``video``/``videos`` keys, a video part in its messages) or holds a ``<video>``
    marker (one without a video is then reported)."""
    if not isinstance(record, dict):
        return False
    messages = record.get("messages")
    texts = "".join(str(record.get(key, "")) for key in ("messages", "conversations", "question"))
    return "video" in record or "videos" in record or VIDEO_MARKER in texts or (
        isinstance(messages, list) and any(_video_parts(m) for m in messages))


def video_sample(record: dict, row: int, where: str, root: Path, build):
    """The ``Sample`` (or ``Problem``) of a row with videos: ``build`` (``formats.record_sample``) makes the
    sample of the row without them; a row without images gets ``image_path`` None and no image in any turn."""
    from vlm_lora.data.formats import Problem

    extracted = extract_videos(record, root)
    if isinstance(extracted, str):
        return Problem(record.get("id", row), where, extracted)
    rest, videos = extracted
    without_images = not _shows_images(rest)
    sample = build({**rest, "image": NO_IMAGE} if without_images else rest)
    if isinstance(sample, Problem):
        return sample
    if without_images:  # the placeholder only let the image-row readers build the turns
        sample.image_path, sample.image_source, sample.image_turns = None, None, [0] * len(sample.turns)
    return attach_videos(sample, videos)


def _shows_images(record: dict) -> bool:
    """Whether a row (its videos taken out) has images: image keys, image parts or ``<image>`` markers."""
    from vlm_lora.data.messages import chat_conversation

    if any(record.get(k) not in (None, "", []) for k in ("image", "images", "file_name")):
        return True
    if isinstance(record.get("messages"), list):
        parsed = chat_conversation(record["messages"])
        return not isinstance(parsed, str) and bool(parsed[1])
    return any("<image>" in str(m.get("value", "")) for m in record.get("conversations") or [] if isinstance(m, dict))


def extract_videos(record: dict, root: Path) -> tuple[dict, list[VideoRef]] | str:
    """(the row without its video keys, video parts of its messages turned into ``<video>`` markers; its videos
    in marker order), or why they do not add up. A row without videos comes back as it is, with []."""
    row_level = record.get("videos", record.get("video"))
    row_level = [] if row_level is None else row_level if isinstance(row_level, list) else [row_level]
    if not all(isinstance(v, str) and v for v in row_level):
        return "'video' must be a path (a frames folder or a video file), or 'videos' a list of paths"
    messages, inline = record.get("messages"), []
    if isinstance(messages, list) and any(_video_parts(m) for m in messages):
        messages = [_markers_for_parts(m, inline) for m in messages]
    if not row_level and not inline:
        return record, []
    empty = sum(v is None for v in inline)
    if inline and empty != len(row_level):
        return f"{len(row_level)} row-level video(s) but {empty} video part(s) without a video of their own"
    rest = iter(row_level)
    paths = [next(rest) if v is None else v for v in inline] if inline else row_level
    fps = record.get("video_fps")
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0):
        return f"'video_fps' must be a positive number (frames per second of the source), got {fps!r}"
    if not all(isinstance(p, str) and p for p in paths):
        return "a video part's 'video' must be a path"
    record = {k: v for k, v in record.items() if k not in ("video", "videos", "video_fps")}
    if messages is not record.get("messages") and "messages" in record:
        record["messages"] = messages
    return record, [VideoRef(root / p.removeprefix("file://"), None if fps is None else float(fps)) for p in paths]


def _video_parts(message: Any) -> list:
    content = message.get("content") if isinstance(message, dict) else None
    return [c for c in content if isinstance(c, dict) and c.get("type") == "video"] if isinstance(content, list) else []


def _markers_for_parts(message: Any, inline: list) -> Any:
    """The message with each video part a ``<video>`` text part; the parts' own videos appended to ``inline``."""
    if not _video_parts(message):
        return message
    content = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") == "video":
            inline.append(part.get("video") or part.get("path"))
            part = {"type": "text", "text": VIDEO_MARKER}
        content.append(part)
    return {**message, "content": content}


def attach_videos(sample, videos: list[VideoRef]):
    """``sample`` with ``videos``: ``<video>`` markers counted per user turn and removed from the text; or a
    ``Problem`` when markers and videos differ in number or a marker sits in an answer."""
    from vlm_lora.data.formats import Problem

    counts = [user.count(VIDEO_MARKER) for user, _ in sample.turns]
    if any(VIDEO_MARKER in answer for _, answer in sample.turns):
        return Problem(sample.id, sample.where, "a <video> marker in an assistant turn; videos go in user turns")
    if sum(counts) not in (0, len(videos)):
        return Problem(sample.id, sample.where, f"{len(videos)} video(s) but {sum(counts)} <video> markers or video "
                                                "parts in the user turns; put one per video (or none: all in turn 1)")
    sample.turns = [(re.sub(re.escape(VIDEO_MARKER) + r"\s*", "", user).strip(), answer) for user, answer in sample.turns]
    if sample.question:
        sample.question = sample.question.replace(VIDEO_MARKER, "").strip()
    sample.videos = videos
    sample.video_turns = counts if sum(counts) else [len(videos)] + [0] * (len(sample.turns) - 1)
    return sample
