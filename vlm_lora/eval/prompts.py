"""What an eval asks the model for each example: its conversation replayed up to the last user turn.

A caption example (no turns, or one turn asking ``prompt``) is asked ``prompt`` with its image, as
before. A chat example (LLaVA JSON, conversations in parquet/HF data) is replayed as it was trained:
system prompt, every earlier turn with its answer as history, then the last user turn with its
images and the assistant cue, rendered by the training collator's template (``data.chat_template``
or the processor's). Its reference is that last turn's answer (``Sample.references``), so the reply
is scored against the answer to the question the model saw.
"""

from __future__ import annotations

from vlm_lora.data.collate import ChatCollator
from vlm_lora.data.processors import build_prompt


def render_prompt(processor, prompt: str, chat_template: str | None = None) -> str:
    """The full generation prompt: ``prompt`` put into the chat template, or used verbatim as the
    template when it already contains the image token (e.g. ``"USER: <image>\\nCaption: ASSISTANT:"``)."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    image_token = getattr(image_token, "content", image_token)  # BLIP-2 keeps an AddedToken
    return prompt if image_token in prompt else build_prompt(processor, prompt, chat_template)


def is_conversation(example, prompt: str) -> bool:
    """Whether ``example`` is asked its own conversation rather than ``prompt`` (see the module docstring)."""
    turns = getattr(example, "turns", None)
    if not turns:
        return False
    several_images = bool(getattr(example, "extra_images", None)) or getattr(example, "image_turns", None) not in (None, [1])
    videos = bool(getattr(example, "videos", None))  # asked with its videos in their turn
    return len(turns) > 1 or turns[0][0] != prompt or bool(getattr(example, "system", None)) or several_images or videos


def example_prompts(processor, examples, prompt: str, chat_template: str | None = None) -> list[tuple[str, str]]:
    """``(rendered generation prompt, user text the model saw)`` per example; user turns joined by newlines."""
    plain = (render_prompt(processor, prompt, chat_template), prompt)
    collator = None
    prompts = []
    for example in examples:
        if not is_conversation(example, prompt):
            prompts.append(plain)
            continue
        collator = collator or ChatCollator(processor, chat_template=chat_template, prompt=prompt)
        texts = collator.render(example)  # [user 1 + cue, ... answer 1, ..., last user + cue, last answer]
        prompts.append((texts[-2], "\n".join(user for user, _ in example.turns)))
    return prompts
