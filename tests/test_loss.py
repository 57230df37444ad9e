"""train/loss.py: lm_head and the loss on labelled positions only give the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize_adapters
from vlm_lora.train.loss import labelled_token_loss, next_token_targets, supports_labelled_head


def _loss_and_grads(model, batch, fast: bool):
    model.zero_grad(set_to_none=True)
    loss = labelled_token_loss(model, batch) if fast else model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(model, batch) -> None:
    """Same loss and trainable gradients as ``model(**batch).loss``; lm_head saw only the labelled rows."""
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1]))
    plain_loss, plain = _loss_and_grads(model, batch, fast=False)
    fast_loss, fast = _loss_and_grads(model, batch, fast=True)
    hook.remove()
    labelled = int((next_token_targets(batch["labels"]) != -100).sum())
    assert rows == [batch["input_ids"].shape, (labelled,)] and labelled < batch["input_ids"].numel() // 2
    assert not model.get_output_embeddings()._forward_pre_hooks  # the gather hook is gone again
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert any(".lora_A." in n for n in plain) and any(".lora_B." in n for n in plain) and plain.keys() == fast.keys()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fast[name], grad, atol=1e-6, rtol=1e-5)


def test_tiny_llava_labelled_head_equals_the_models_loss(tiny_llava, tiny_batch):
    """LoRA on decoder and lm_head (a LoRA head sees only the gathered rows too), connector trained;
    labels on a ragged tail of each row, padding included."""
    import vlm_lora

    model = tiny_llava.train()
    vlm_lora.plan(model, "language_only", lm_head={"mode": "lora", "rank": 4, "alpha": 8}).apply(model)
    randomize_adapters(model)
    labels = batch_labels = tiny_batch["input_ids"].clone()
    labels[0, :7] = -100
    labels[1, :6] = -100
    labels[1, 9] = -100  # a padded position
    assert supports_labelled_head(model)
    _assert_same(model, {**tiny_batch, "labels": batch_labels})


def test_tiny_qwen2_5_vl_labelled_head_equals_the_models_loss(tmp_path):
    """Tiny Qwen2.5-VL from its saved folder and chat collator (images of two shapes, right padding)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_lora
    from vlm_lora.architectures.tiny_processors import save_tiny_family
    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import CaptionExample

    folder = save_tiny_family("qwen2_5_vl", tmp_path / "qwen")
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").train()
    collate = ChatCollator(AutoProcessor.from_pretrained(folder))
    items = [(Image.new("RGB", size, (60 * i, 90, 200)), CaptionExample(f"{i}.png", [caption], row=i))
             for i, (size, caption) in enumerate([((48, 48), "red"), ((64, 48), "a blue circle near the edge")])]
    batch = collate(items)
    vlm_lora.plan(model, "language_only").apply(model)
    randomize_adapters(model)
    assert supports_labelled_head(model)
    _assert_same(model, batch)


def test_other_models_keep_their_own_loss():
    from vlm_lora.architectures.tiny_models import tiny_blip2_opt

    assert not supports_labelled_head(tiny_blip2_opt())  # BLIP-2 slices logits itself: plain path


@pytest.mark.parametrize("head_on_labels", [True, False])
def test_caption_task_switch(tiny_llava, tiny_batch, head_on_labels):
    """``train.head_on_labels`` picks the path; both give the same loss."""
    from types import SimpleNamespace

    from vlm_lora.train.tasks import CaptionTask

    task = CaptionTask.__new__(CaptionTask)
    task.recipe = SimpleNamespace(train=SimpleNamespace(head_on_labels=head_on_labels, kernels="none"))
    labels = tiny_batch["input_ids"].clone()
    labels[:, :6] = -100
    batch = {**tiny_batch, "labels": labels}
    seen = []
    tiny_llava.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].dim()))
    with torch.no_grad():
        loss, units = task.loss(tiny_llava, batch)
        torch.testing.assert_close(loss, tiny_llava(**batch).loss)
    assert units == 2 * 4 and seen[0] == (2 if head_on_labels else 3)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "gemma3"])
def test_padding_to_a_multiple_keeps_the_loss_and_gradients(tmp_path, family):
    """``data.pad_to_multiple_of``: the extra right padding is masked and unlabelled, so the loss and every
    trainable gradient equal the unpadded batch's (both heads); the batch length is the next multiple."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_lora
    from vlm_lora.architectures.tiny_processors import save_tiny_family
    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import CaptionExample

    folder = save_tiny_family(family, tmp_path / family)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").train()
    vlm_lora.plan(model, "language_only").apply(model)
    randomize_adapters(model)
    items = [(Image.new("RGB", (48, 48), (60 * i, 90, 200)), CaptionExample(f"{i}.png", [caption], row=i))
             for i, caption in enumerate(["red", "a blue circle near the edge"])]
    plain = ChatCollator(processor)(items)
    padded = ChatCollator(processor, pad_to_multiple_of=32)(items)
    length, padded_length = plain["input_ids"].shape[1], padded["input_ids"].shape[1]
    assert padded_length % 32 == 0 and length < padded_length < length + 32
    assert (padded["labels"][:, length:] == -100).all() and (padded["attention_mask"][:, length:] == 0).all()
    capped = ChatCollator(processor, max_length=length + 1, pad_to_multiple_of=32)(items)  # train.max_length caps it
    assert capped["input_ids"].shape[1] == length + 1
    for fast in (False, True):
        plain_loss, plain_grads = _loss_and_grads(model, plain, fast)
        padded_loss, padded_grads = _loss_and_grads(model, padded, fast)
        torch.testing.assert_close(padded_loss, plain_loss, atol=1e-6, rtol=1e-6)
        for name, grad in plain_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(padded_grads[name], grad, atol=1e-6, rtol=1e-5)


class _FixedCollate:
    """A collator (module level: it pickles) that returns one batch."""
    skipped = ["kept"]

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, items):
        return dict(self.batch)


def test_positions_found_with_the_batch_give_the_same_loss_and_never_reach_the_model(tiny_llava, tiny_batch):
    """``WithLabelledPositions`` finds the answer positions on the CPU (the training loader's collator):
    the loss with them equals the loss that finds them itself, and the model does not see the key."""
    import pickle

    import vlm_lora
    from vlm_lora.data.labelled import LABELLED_POSITIONS, WithLabelledPositions

    model = tiny_llava.train()
    vlm_lora.plan(model, "language_only").apply(model)
    randomize_adapters(model)
    labels = tiny_batch["input_ids"].clone()
    labels[:, :7] = -100
    collate = pickle.loads(pickle.dumps(WithLabelledPositions(_FixedCollate({**tiny_batch, "labels": labels}))))
    batch = collate([])
    assert collate.skipped == ["kept"]
    assert batch[LABELLED_POSITIONS].tolist() == [6, 7, 8, 16, 17, 18]  # next token labelled: rows of 10
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    own_loss, own = _loss_and_grads(model, {**tiny_batch, "labels": labels}, fast=True)
    given_loss, given = _loss_and_grads(model, batch, fast=True)
    assert seen[0] == seen[1] and LABELLED_POSITIONS not in seen[1] and "input_ids" in seen[1]
    assert torch.equal(given_loss, own_loss) and all(torch.equal(given[n], own[n]) for n in own)
