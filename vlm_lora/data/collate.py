"""The chat collator: conversations -> padded batches with labels only on the assistant answers.

``ChatCollator`` renders each conversation with the processor's chat template (or a recipe's),
tokenizes it turn by turn so that every assistant span is known exactly, masks image tokens,
system and user turns with ``IGNORE_INDEX``, and never truncates image tokens; ``check_lengths``
finds samples that cannot fit ``max_length`` before training starts.
"""

from __future__ import annotations

import logging
from itertools import accumulate

import torch
from PIL import Image

from vlm_lora.data.datasets import FALLBACK_CHAT_TEMPLATE, IGNORE_INDEX, ON_BAD_SAMPLE, CaptionExample
from vlm_lora.data.formats import DEFAULT_PROMPT, DataError, Problem, Sample
from vlm_lora.data.processors import (FLAT_IMAGE_PROCESSORS, SINGLE_IMAGE_PROCESSORS, SUFFIX_PROCESSORS,
                                      build_prompt, inserts_image_tokens, length_multiple, pad_batch,
                                      pad_length_to_multiple)
from vlm_lora.data.video import (VideoClip, blank_clip, load_media, media_turn, media_turns,
                                 processor_kwargs, refuse_video)

log = logging.getLogger("vlm_lora")


# ---------------------------------------------------------------- collators

class ChatCollator:
    """Training batches of ``(image, sample)`` items: the rendered conversation with labels on the answers.

    The conversation is rendered with the chat template (``chat_template`` overrides the processor's)
    up to each user turn (with the assistant cue) and up to the end of each assistant turn; the token
    counts of these prefixes give each answer's exact token range. Labels are the answer tokens and the
    end-of-turn token closing each answer; image, system and user tokens and padding are ``IGNORE_INDEX``.
    Without a chat template (BLIP-2): the user text is the plain prompt, the answer follows after a space
    and ends with EOS.

    ``max_length``: a longer sample is cut inside its last answer that still fits (turns after it are
    dropped); image tokens and prompts are never cut. A sample whose image + prompt + first answer token
    do not fit is a ``DataError`` naming it, or with ``on_bad_sample="skip"`` dropped and counted in
    ``skipped`` (``check_lengths(dataset)`` does this for a whole data set before training).

    Prefix-LM processors (``SUFFIX_PROCESSORS``, PaliGemma) get the prompt as ``text`` and the answer as
    ``suffix``; their labels are the processor's (one turn per sample).

    Multi-image samples (items ``([image, ...], sample)``, ``sample.image_turns`` images per user turn): one
    image part per image in its turn, the images passed as one list per sample (``FLAT_IMAGE_PROCESSORS``:
    flat). ``SINGLE_IMAGE_PROCESSORS`` and the no-template path refuse them: a ``DataError`` naming the
    sample, or skipped and counted with ``on_bad_sample="skip"``. A cut at ``max_length`` keeps every image.

    Returns right-padded ``input_ids``, ``attention_mask``, ``labels`` [B, T] and every other tensor the
    processor returns: per-token ones ([1, T, ...]: ``token_type_ids``, ``mm_token_type_ids``, Mllama's
    ``cross_attention_mask`` [B, T, images, tiles]) right-padded with zeros; the others (``pixel_values``
    [B, 3, H, W] or Qwen-VL's flattened patches [N, D], ``image_grid_thw``, ``aspect_ratio_ids``,
    ``pixel_attention_mask`` ...) concatenated along dim 0, zero-padded first where per-sample shapes
    differ (different tile or split counts). ``pad_to_multiple_of``: the per-token tensors are right-padded further,
    to the next multiple of it (masked, unlabelled), so a run sees few distinct lengths.
    """

    def __init__(self, processor, max_length: int | None = None, chat_template: str | None = None,
                 on_bad_sample: str = "error", prompt: str = DEFAULT_PROMPT,
                 pad_to_multiple_of: int | None = None):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise DataError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no pad token; set one in the model folder")
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.on_bad_sample = on_bad_sample
        self.user_prompt = prompt
        self.template = chat_template or getattr(processor, "chat_template", None)
        self.prefix_lm = not self.template and type(processor).__name__ in SUFFIX_PROCESSORS
        self.plain = not self.template and inserts_image_tokens(processor)
        self.multi_image = not (self.prefix_lm or self.plain) and type(processor).__name__ not in SINGLE_IMAGE_PROCESSORS
        if not self.template and not self.plain:
            self.template = FALLBACK_CHAT_TEMPLATE
        self.skipped: list[Problem] = []  # dropped at collate time (image unreadable, too long)
        # a batch of text-only samples gets one image-only row without labels, so the vision tower runs on
        # every rank (DDP/FSDP: the same collectives and gradients everywhere); the loop sets it for >1 process
        self.vision_dummy = False
        self._dummy: tuple[dict, set[str]] | None = None
        self.truncated: list = []  # ids of samples cut at max_length, each time one is
        self._shift: dict = {}  # (image size, add_special_tokens) -> tokens the processor adds
        self.pixel_budget = None  # a PixelBudget with max_total_pixels: one sample's images fit it first
        self._warned = False

    # -- rendering

    def conversation(self, example) -> tuple[str | None, list[tuple[str, str]]]:
        """(system, turns) of a ``Sample``; a ``CaptionExample`` is one turn (prompt, first caption)."""
        turns = getattr(example, "turns", None)
        if turns:
            return getattr(example, "system", None), list(turns)
        if getattr(example, "captions", None):
            return None, [(self.user_prompt, example.captions[0])]
        raise DataError(f"{_where(example)}: no assistant answer to train on")

    def render(self, example) -> list[str]:
        """Prefixes of the rendered conversation: up to user turn 1 + assistant cue, up to the end of answer 1, ...

        Each is a prefix of the next; the last is the whole conversation.
        """
        system, turns = self.conversation(example)
        texts, messages, text = [], [], ""
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        eos = self.tokenizer.eos_token or ""
        counts = media_turns(example, len(turns))  # (images, videos) per user turn
        for i, (user, answer) in enumerate(turns):
            if self.plain:
                text += user if i == 0 else " " + user
                texts.append(text)
                text += " " + answer + eos
                texts.append(text)
                continue
            messages.append(media_turn(user, *counts[i]))
            texts.append(self._apply(messages, True))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            texts.append(self._apply(messages, False))
        for before, after in zip(texts, texts[1:]):
            if not after.startswith(before):
                raise DataError(f"{_where(example)}: the chat template renders earlier turns differently once "
                                "later ones follow, so the answers cannot be located; set data.chat_template")
        return texts

    def _apply(self, messages: list[dict], generation: bool) -> str:
        return self.processor.apply_chat_template(list(messages), chat_template=self.template,
                                                  add_generation_prompt=generation, tokenize=False)

    def _layout(self, example) -> tuple[list[str], bool, list[int], list[int]]:
        """(rendered prefixes, add_special_tokens, token ids of the whole text without image expansion,
        token count of each prefix)."""
        texts = self.render(example)
        bos = self.tokenizer.bos_token
        add_special = not (bos and texts[0].startswith(bos))  # the template already holds BOS
        prefixes = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        full = prefixes[-1]
        bounds = []
        for ids in prefixes:  # a prefix's tokens start the full tokens; should a merge cross, take the common part
            n = 0
            while n < len(ids) and ids[n] == full[n]:
                n += 1
            if n < len(ids) and not self._warned:
                self._warned = True
                log.warning("%s: a token spans a turn boundary of the chat template; the turn starts at it",
                            _where(example))
            bounds.append(n)
        return texts, add_special, full, bounds

    # -- lengths

    def _fit(self, example, spans: list[tuple[int, int]], total: int) -> tuple[int, list[tuple[int, int]]]:
        """(kept length, answer spans kept) under ``max_length``; raises ``_Skip`` if not even one answer token
        fits after the last image."""
        if self.max_length is None or total <= self.max_length:
            return total, spans
        counts = _image_counts(example, len(spans))
        first = max(i for i, n in enumerate(counts) if n) if any(counts) else 0  # the turn of the last image
        fitting = [i for i, (start, _) in enumerate(spans) if i >= first and start + 1 <= self.max_length]
        if not fitting:
            what = "image + prompt + first answer token" if first == 0 else f"images + prompts + answer {first + 1}"
            raise _Skip(_problem(example, f"{what} need {spans[first][0] + 1} tokens > max_length {self.max_length}"))
        last = fitting[-1]
        cut = min(spans[last][1], self.max_length)
        return cut, spans[:last] + [(spans[last][0], cut)]

    def _image_shift(self, text: str, add_special: bool, sizes: list[tuple[int, int]]) -> int:
        """Tokens the processor adds to ``text`` (image expansion, BOS) for images of ``sizes``; cached by sizes."""
        key = (tuple(tuple(size) for size in sizes), add_special)
        if key not in self._shift:
            blanks = [blank_clip(size) if size[0] == "video" else Image.new("RGB", tuple(size)) for size in sizes]
            ids = self._process(blanks, text, add_special)["input_ids"]
            self._shift[key] = ids.shape[1] - len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._shift[key]

    def _process(self, images: list[Image.Image], text: str, add_special: bool) -> dict:
        """The processor on one text and its images (a flat list for ``FLAT_IMAGE_PROCESSORS``, else nested)."""
        if not images or any(isinstance(image, VideoClip) for image in images):  # videos: vlm_lora.data.video
            return self.processor(text=[text], return_tensors="pt", add_special_tokens=add_special,
                                  **processor_kwargs(images, nested=False))
        nested = len(images) > 1 and type(self.processor).__name__ not in FLAT_IMAGE_PROCESSORS
        return self.processor(images=[images] if nested else images, text=[text], return_tensors="pt",
                              add_special_tokens=add_special)

    def _turn_shifts(self, example, texts: list[str], add_special: bool, sizes: list, full_shift: int | None) -> list[int]:
        """Tokens the processor adds before each answer: the expansion of the images shown so far (and BOS).

        ``full_shift``: the known shift with all images (None: measure it)."""
        shifts = []
        for turn, seen in enumerate(accumulate(_image_counts(example, len(texts) // 2))):
            known = full_shift if seen == len(sizes) else None
            shifts.append(known if known is not None else self._image_shift(texts[2 * turn], add_special, sizes[:seen]))
        return shifts

    def _refuse_multi_image(self, example, n_images: int) -> None:
        if n_images > 1 and not self.multi_image:
            problem = _problem(example, f"{n_images} images in one sample; {type(self.processor).__name__} takes "
                                        "one image per sample (drop the extra images or set data.on_bad_sample: skip)")
            if self.on_bad_sample == "error":
                raise DataError(str(problem))
            raise _Skip(problem)

    def _refuse_text_only(self, example, n_images: int) -> None:
        if n_images == 0 and (self.prefix_lm or self.plain):
            problem = _problem(example, f"no image; {type(self.processor).__name__} needs an image in every sample "
                                        "(add one or set data.on_bad_sample: skip)")
            if self.on_bad_sample == "error":
                raise DataError(str(problem))
            raise _Skip(problem)

    def check_lengths(self, dataset) -> list[Problem]:
        """Before training: the samples that cannot fit ``max_length`` (``vlm_lora.data.lengths``)."""
        from vlm_lora.data.lengths import check_lengths  # it reads this collator's layout

        return check_lengths(self, dataset)

    # -- encoding

    def encode(self, image: Image.Image | list[Image.Image], example) -> dict[str, torch.Tensor]:
        """One sample: ``input_ids``, ``attention_mask``, ``labels`` [T] (and any other per-token tensor
        [T, ...]); the processor's other tensors (``pixel_values`` [1, 3, H, W], ...) as it returns them.
        ``image``: the sample's image, or the list of its images."""
        return self._encode(image, example)[0]

    def _encode(self, image: Image.Image | list[Image.Image], example) -> tuple[dict[str, torch.Tensor], set[str]]:
        """(``encode``'s dict, the keys of its per-token tensors)."""
        images = image if isinstance(image, list) else [image]
        images = self._media(images, example) if refuse_video(self.processor, example) else images
        images = self.pixel_budget.fit_images(images) if self.pixel_budget else images
        self._refuse_multi_image(example, len(images))
        self._refuse_text_only(example, len(images))
        if self.prefix_lm:
            encoded = self._encode_suffix(image, example)
            ids = encoded["input_ids"][0]
            total, spans = ids.shape[0], _label_spans(encoded["labels"][0])
        else:
            texts, add_special, full, bounds = self._layout(example)
            encoded = self._process(images, texts[-1], add_special)
            ids = encoded["input_ids"][0]
            total = ids.shape[0]
            # tokens the processor added in front of each answer: image expansion, BOS
            shifts = self._turn_shifts(example, texts, add_special, [im.size for im in images], total - len(full))
            spans = [(shift + bounds[2 * i], shift + bounds[2 * i + 1]) for i, shift in enumerate(shifts)]
            checked = [(shifts[0] + bounds[0], total)] if len(set(shifts)) == 1 else spans  # one shift: the whole tail
            if min(shifts) < 0 or any(ids[start:end].tolist() != full[start - shift:end - shift]
                                      for (start, end), shift in zip(checked, shifts)):
                later = "" if len(set(shifts)) == 1 else (" (images in later turns: this processor expands an image "
                                                           "differently alone; put every <image> in the first turn)")
                raise DataError(f"{_where(example)}: the processor changed text tokens after the image placeholder; "
                                f"cannot align the labels{later}")
        kept, spans = self._fit(example, spans, total)
        if kept < total:
            self.truncated.append(_problem(example, "").id)
        labels = torch.full((kept,), IGNORE_INDEX, dtype=torch.long)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        out, per_token = {"input_ids": ids[:kept], "labels": labels}, {"input_ids", "labels"}
        for key, value in encoded.items():
            if key in out or not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 2 and tuple(value.shape[:2]) == (1, total):
                out[key] = value[0, :kept]
                per_token.add(key)
            else:
                out[key] = value
        return out, per_token

    def _media(self, items: list, example) -> list:
        """A video sample's images and clips, its videos read now; an unreadable one skips it under skip."""
        try:
            return load_media(items, self.processor, _where(example))
        except DataError as error:
            if self.on_bad_sample == "error":
                raise
            raise _Skip(_problem(example, str(error).removeprefix(f"{_where(example)}: "))) from None

    def _encode_suffix(self, image: Image.Image, example) -> dict[str, torch.Tensor]:
        """A prefix-LM processor's encoding of the one turn of ``example``: prompt as text, answer as suffix."""
        _, turns = self.conversation(example)
        if len(turns) != 1:
            raise DataError(f"{_where(example)}: {type(self.processor).__name__} takes one prompt and one answer "
                            f"per image, this sample has {len(turns)} turns")
        (prompt, answer), = turns
        return self.processor(images=[image], text=[prompt], suffix=[answer], return_tensors="pt")

    def __call__(self, items: list[tuple[Image.Image | None, Sample | CaptionExample]]) -> dict[str, torch.Tensor]:
        encoded, dropped, per_token, with_images = [], [], set(), False
        for image, example in items:
            if image is None:  # the data set skipped it (unreadable image) and logged why
                dropped.append(_problem(example, "image could not be loaded"))
                continue
            try:
                sample, keys = self._encode(image, example)
                encoded.append(sample)
                per_token |= keys
                with_images |= not (isinstance(image, list) and not image)
            except _Skip as error:
                if self.on_bad_sample == "error":
                    raise DataError(f"{error.problem} (call collator.check_lengths(dataset) to find all such "
                                    "samples before training)") from None
                dropped.append(error.problem)
        if dropped:
            self.skipped += dropped
            log.warning("skipped %d sample(s) of a batch (%d so far): %s", len(dropped), len(self.skipped),
                        "; ".join(map(str, dropped)))
        if not encoded:
            raise DataError("every sample of a batch was skipped (" + "; ".join(map(str, dropped)) +
                            "); call collator.check_lengths(dataset) before training")
        if self.vision_dummy and not with_images:
            dummy, keys = self.dummy_row()
            encoded.append(dummy)
            per_token |= keys
        return self._pad(encoded, per_token)

    def dummy_row(self) -> tuple[dict, set[str]]:
        """(one blank 64x64 image with a one-word answer, encoded, with every label ``IGNORE_INDEX``; its
        per-token keys). It adds no loss and zero gradients but runs the vision tower and projector."""
        if self._dummy is None:
            example = Sample("vision dummy", None, [(self.user_prompt, "ok")], ["ok"], where="vision dummy")
            sample, keys = self._encode(Image.new("RGB", (64, 64)), example)
            sample["labels"] = torch.full_like(sample["labels"], IGNORE_INDEX)
            self._dummy = (sample, keys)
        return self._dummy

    def _pad(self, encoded: list[dict], per_token: set[str]) -> dict[str, torch.Tensor]:
        fill = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        batch = pad_batch(encoded, per_token, fill)
        if self.pad_to_multiple_of:
            batch = pad_length_to_multiple(batch, per_token, fill, self.pad_to_multiple_of, limit=self.max_length)
        return batch


class CaptionCollator(ChatCollator):
    """``ChatCollator`` for caption data: every example is one turn ``(prompt, first caption)``.

    ``prompt`` is the rendered generation prompt (what generation sees).
    """

    def __init__(self, processor, prompt: str, max_length: int | None = None, chat_template: str | None = None,
                 on_bad_sample: str = "error"):
        super().__init__(processor, max_length, chat_template, on_bad_sample, prompt=prompt)
        self.prompt = build_prompt(processor, prompt, chat_template)

    def conversation(self, example) -> tuple[str | None, list[tuple[str, str]]]:
        if not getattr(example, "captions", None):
            raise DataError(f"{_where(example)}: no caption to train on")
        return None, [(self.user_prompt, example.captions[0])]


def _label_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the one run of labelled (not ``IGNORE_INDEX``) positions of a prefix-LM sample."""
    where = (labels != IGNORE_INDEX).nonzero().flatten()
    return [(int(where[0]), int(where[-1]) + 1)] if len(where) else []


def _problem(example, reason: str) -> Problem:
    return Problem(getattr(example, "id", example.row), _where(example), reason)


def make_collator(processor, recipe) -> ChatCollator:
    """The training collator of a recipe: ``data.chat_template``/``on_bad_sample``/``prompt``/``pad_to_multiple_of``,
    ``train.max_length``."""
    collator = ChatCollator(processor, max_length=recipe.train.max_length, chat_template=recipe.data.chat_template,
                            on_bad_sample=recipe.data.on_bad_sample, prompt=recipe.data.prompt,
                            pad_to_multiple_of=length_multiple(recipe.data, torch.cuda.is_available()))
    if getattr(recipe.data, "max_total_pixels", None):
        from vlm_lora.data.pixels import PixelBudget

        collator.pixel_budget = PixelBudget.of(processor, recipe.data.max_total_pixels)
    return collator


class _Skip(Exception):
    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def _image_counts(example, n_turns: int) -> list[int]:
    """Images and videos shown in each user turn (``image_turns``, else one image in the first turn)."""
    return [n_images + n_videos for n_images, n_videos in media_turns(example, n_turns)]


def _where(example) -> str:
    return getattr(example, "where", "") or f"row {example.row}"
