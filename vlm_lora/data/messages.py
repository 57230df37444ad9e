"""Chat-message rows (``{"messages": [{"role", "content"}], "images": [...]}``) as LLaVA conversations.

The HF ecosystem puts a row's images in three places, all read here:

* row level: ``"images": [...]`` (or ``image``), taken in order by the ``{"type": "image"}`` parts
  (or ``<image>`` markers of string content) that carry no image themselves;
* message level: ``"images": [...]`` on a message, taken by that message's empty image parts (a message
  without image parts shows all of its images first);
* inline: ``{"type": "image", "image" | "path" | "url": ...}`` parts (and OpenAI-style
  ``{"type": "image_url", "image_url": {"url": ...}}``) holding a path, bytes, a ``{bytes, path}`` struct,
  a PIL image or a ``data:`` URI.

``chat_conversation`` turns the messages into LLaVA ``{"from", "value"}`` messages with one ``<image>``
marker per image and the list of images the markers refer to (``None``: the next row-level image);
``message_images`` puts the row-level images in the empty markers' places and ``resolve_image`` makes each
image value a path or an ``EmbeddedBytes``.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_PART_TYPES = ("image", "image_url")
INLINE_IMAGE_KEYS = ("image", "path", "url")
MESSAGE_FORMAT = ("needs 'messages': a list of {role, content} with content a string or a list of {type: image} / "
                  "{type: text, text} parts")


@dataclass(frozen=True)
class EmbeddedBytes:
    """Image bytes held by the sample (a streamed tar member, an inline image of a message)."""

    data: bytes

    def open(self):
        return io.BytesIO(self.data)


def _part_image(part: dict) -> Any:
    """The image an image part carries (None: it refers to a row- or message-level image)."""
    if part.get("type") == "image_url":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, dict) else value
    return next((part[k] for k in INLINE_IMAGE_KEYS if part.get(k) is not None), None)


def _message(message: Any, index: int) -> tuple[str, str, list] | str:
    """(role, text, the images of its markers) of one message, or why it is malformed."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return MESSAGE_FORMAT
    content = message.get("content")
    if isinstance(content, str):
        text, images = content.replace("<image>", "").strip(), [None] * content.count("<image>")
    elif isinstance(content, list) and all(isinstance(c, dict) for c in content):
        texts = [c.get("text") for c in content if c.get("type") == "text"]
        if not all(isinstance(t, str) for t in texts):
            return MESSAGE_FORMAT
        text = " ".join(t.strip() for t in texts)
        images = [_part_image(c) for c in content if c.get("type") in IMAGE_PART_TYPES]
    else:
        return MESSAGE_FORMAT
    own = message.get("images")
    if own is not None:
        own = own if isinstance(own, list) else [own]
        empty = [i for i, image in enumerate(images) if image is None]
        if not empty:
            images = own + images
        elif len(empty) == len(own):
            for i, image in zip(empty, own):
                images[i] = image
        else:
            return (f"message {index + 1} has {len(own)} image(s) in 'images' but {len(empty)} image part(s) "
                    "without an image")
    return message["role"], text, images


def chat_conversation(messages: Any) -> tuple[list[dict], list] | str:
    """(LLaVA ``{"from", "value"}`` messages with one ``<image>`` per image, the image of each marker in
    order: a value, or None for the next row-level image), or why the messages are malformed."""
    if not isinstance(messages, list) or not messages:
        return MESSAGE_FORMAT
    conversation, images = [], []
    for index, message in enumerate(messages):
        parsed = _message(message, index)
        if isinstance(parsed, str):
            return parsed
        role, text, shown = parsed
        conversation.append({"from": role, "value": "<image>" * len(shown) + text})
        images += shown
    return conversation, images


def resolve_image(value: Any, root: Path) -> Path | EmbeddedBytes | str:
    """A path (relative to ``root``) or ``EmbeddedBytes`` for an image value, or why it cannot be one."""
    if isinstance(value, Path) or hasattr(value, "open"):  # resolved already (a path, an embedded source)
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return EmbeddedBytes(buffer.getvalue())
    if isinstance(value, (bytes, bytearray)):
        return EmbeddedBytes(bytes(value))
    if not isinstance(value, str) or not value:
        return f"an image is {type(value).__name__}, not a path, bytes or a PIL image"
    if value.startswith("data:"):
        try:
            return EmbeddedBytes(base64.b64decode(value.partition(",")[2], validate=True))
        except (binascii.Error, ValueError):
            return "an image data: URI is not base64"
    if value.startswith(("http://", "https://")):
        return f"image URLs are not downloaded ({value[:60]}); download the images and give their paths"
    return root / value.removeprefix("file://")


def message_images(inline: list, given: list | None, row_value: Any, root: Path) -> list | str:
    """The images of a chat row's markers in order: the messages' own, the others taken from the row's
    (``given`` sources, else the row's ``image``/``images`` value), or why they do not add up."""
    row_level = given if given is not None else [] if row_value is None else \
        row_value if isinstance(row_value, list) else [row_value]
    empty = sum(value is None for value in inline)
    if empty != len(row_level):
        return f"{len(row_level)} row-level image(s) but {empty} image part(s) without an image of their own"
    rest = iter(row_level)
    images = [resolve_image(next(rest) if value is None else value, root) for value in inline]
    bad = next((i for i in images if isinstance(i, str)), None)
    return bad or images
