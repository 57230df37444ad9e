"""Text-only rows: read from caption, chat, LLaVA, parquet and HF data; mixed into image batches; a
text-only batch on one rank of a 2-process DDP or FSDP run (or of 2 nodes x 1 process) neither hangs nor
changes the adapter; the runs' metrics carry the peak memory of every rank."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ASSET_DATA, ASSET_MODEL, REPO
from test_distributed import ENV
from test_training_runs import _adapter, _cli

IMAGE_ROWS = [{**json.loads(r), "image": str(ASSET_DATA / "microscopy" / json.loads(r)["image"])}
              for r in (ASSET_DATA / "microscopy" / "train.jsonl").read_text().splitlines()[:8]]
TEXT_ROWS = [{"caption": "a slide report needs a stain, a count and a place."},
             {"messages": [{"role": "user", "content": "Name a stain."}, {"role": "assistant", "content": "pink"}]},
             {"conversations": [{"from": "human", "value": "How many cells?"}, {"from": "gpt", "value": "five"}]},
             {"caption": "purple stain is common in these slides."}]


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ASSET_MODEL)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_without_image_are_text_only_samples(tmp_path):
    import datasets

    from vlm_lora.data.datasets import load_dataset

    data = load_dataset(_write(tmp_path / "d.jsonl", [IMAGE_ROWS[0], *TEXT_ROWS[:3]]))
    assert [e.text_only for e in data.examples] == [False, True, True, True] and not data.skipped
    assert data.examples[1].turns == [("Describe the image.", TEXT_ROWS[0]["caption"])]
    assert data.examples[2].turns == [("Name a stain.", "pink")] and data.examples[3].turns == [("How many cells?", "five")]
    assert data[1][0] == [] and data[0][0].size == (48, 48)  # no image to load
    with pytest.raises(Exception, match="<image> marker"):  # a marker without an image is still a bad row
        load_dataset(_write(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "<image>\nQ"},
                                                                        {"from": "gpt", "value": "A"}]}]))
    images = [{"bytes": open(IMAGE_ROWS[0]["image"], "rb").read(), "path": None}, None]
    table = datasets.Dataset.from_dict({"image": images, "caption": ["with image", "without"]})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "d.parquet"))
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    for source in (tmp_path / "d.parquet", tmp_path / "hf"):
        data = load_dataset(source)
        assert [e.text_only for e in data.examples] == [False, True] and data[1][0] == []


def test_mixed_batch_and_vision_dummy_keep_loss_and_gradients(processor, tmp_path):
    """A mixed batch's text rows score as they do alone; the dummy image row of a text-only batch adds
    no loss and exactly zero gradients, but gives the vision tower and projector (zero) gradients."""
    from transformers import AutoModelForImageTextToText

    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import load_dataset

    data = load_dataset(_write(tmp_path / "d.jsonl", [IMAGE_ROWS[0], *TEXT_ROWS[:3]]))
    model = AutoModelForImageTextToText.from_pretrained(ASSET_MODEL)
    collate = ChatCollator(processor)
    mixed = collate([data[0], data[1]])
    assert mixed["pixel_values"].shape[0] == 1 and mixed["input_ids"].shape[0] == 2
    text = [data[1], data[2], data[3]]

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads(collate(text))
    collate.vision_dummy = True
    batch = collate(text)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 1
    assert (batch["labels"][3] == -100).all()
    dummy_loss, dummy = loss_and_grads(batch)
    torch.testing.assert_close(dummy_loss, plain_loss, atol=1e-6, rtol=0)
    _, with_image = loss_and_grads(mixed)
    reached = {name for name, grad in with_image.items() if grad is not None}
    assert {name for name, grad in dummy.items() if grad is not None} == reached  # as in a batch with an image
    for name, grad in plain.items():
        if grad is None:  # vision tower and projector: untouched without the dummy, zeros with it
            assert name not in reached or not dummy[name].any(), name
        else:
            torch.testing.assert_close(dummy[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert any(grad is None and name in reached for name, grad in plain.items())
    assert collate([data[0], data[1]])["input_ids"].shape[0] == 2  # a batch with an image gets no dummy


def test_processor_that_needs_an_image_names_the_sample(tmp_path):
    from transformers import AutoProcessor

    from vlm_lora.data.collate import ChatCollator
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.data.formats import DataError

    data = load_dataset(_write(tmp_path / "d.jsonl", [IMAGE_ROWS[0], TEXT_ROWS[0]]))
    collate = ChatCollator(AutoProcessor.from_pretrained(REPO / "assets" / "tiny-blip2"))
    with pytest.raises(DataError, match="line 2: no image; Blip2Processor needs an image in every sample"):
        collate([data[0], data[1]])


def test_eval_set_with_text_only_rows_is_refused_by_name(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lora.data.formats import DataError
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train.setup import build_task_and_data

    data = _write(tmp_path / "d.jsonl", [IMAGE_ROWS[0], TEXT_ROWS[0]])
    train = _write(tmp_path / "train.jsonl", [IMAGE_ROWS[0], TEXT_ROWS[0], TEXT_ROWS[0]])  # eval must not be train
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.train={train}", f"data.eval={data}"])
    model = AutoModelForImageTextToText.from_pretrained(ASSET_MODEL)
    with pytest.raises(DataError, match=r"d.jsonl: 1 row\(s\) without an image \(line 2\); eval captions images"):
        build_task_and_data(recipe, model, AutoProcessor.from_pretrained(ASSET_MODEL))


# ---------------------------------------------------------------- 2 processes

def _text_first_recipe(tmp_path, name: str, mode: str, **train):
    """8 rows, batch 2: micro-batch 1 (rank 1's first) is text-only, micro-batch 3 mixed, the others images.

    LoRA on the vision tower and a trained projector: without the dummy row rank 1 has no gradient for
    them (DDP fails, FSDP waits for its all-gathers)."""
    from vlm_lora.data.loader import micro_batches

    order = micro_batches(8, 2, seed=0, epoch=0)
    rows = list(IMAGE_ROWS)
    for i, index in enumerate(order[1] + order[3][:1]):
        rows[index] = TEXT_ROWS[i]
    data = _write(tmp_path / "data.jsonl", rows)
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe.update(model={"path": str(ASSET_MODEL), "dtype": "float32"}, data={"train": str(data)},
                  output_dir=str(tmp_path / name))
    recipe["components"]["language_decoder"].update(dropout=0.0, rank=4, alpha=8)
    recipe["components"]["vision_encoder"] = {"mode": "lora", "rank": 4, "alpha": 8}
    recipe["train"].update({"batch_size": 2, "max_steps": 2, "save_steps": None, "eval_steps": None, "log_steps": 1,
                            "warmup_steps": 0, "seed": 0, "fsdp": mode == "fsdp", **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def one_process_text_first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_one")
    result = _cli("finetune", str(_text_first_recipe(tmp, "one", "single", grad_accum=2)))
    assert result.returncode == 0, result.stderr[-2000:]
    _check_memory_rows(tmp / "one", result.stderr, ranks=1)
    return tmp / "one"


def _check_memory_rows(run, stderr: str, ranks: int) -> None:
    """Every training row carries one peak per rank; the done line prints the largest of the last row."""
    import re

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peaks = [row["peak_mem_mib"] for row in rows if "loss" in row]
    assert len(peaks) == 2 and all(len(p) == ranks and min(p) > 50 for p in peaks), peaks  # > the interpreter alone
    assert f"peak memory {max(peaks[-1]):.0f} MiB (largest rank)" in stderr
    ratio = re.search(r"measured / estimate = ([0-9.]+)", stderr)
    assert ratio and float(ratio.group(1)) > 0


@pytest.mark.slow
def test_rank_with_a_text_only_batch_keeps_in_step_under_fsdp(one_process_text_first, tmp_path):
    """FSDP with sharded loading; DDP is the 2-node test below (the same data, ranks and check)."""
    mode = "fsdp"
    recipe = _text_first_recipe(tmp_path, "two", mode)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlm_lora",
                             "finetune", str(recipe)], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_memory_rows(tmp_path / "two", result.stderr, ranks=2)
    assert "sharded loading: 82 tensors read slice by slice" in result.stderr
    ours, theirs = _adapter(tmp_path / "two"), _adapter(one_process_text_first)
    assert ours.keys() == theirs.keys() and any("vision_tower" in k for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0, msg=key)


@pytest.mark.slow
def test_two_nodes_of_one_process_each(one_process_text_first, tmp_path):
    """torchrun --nnodes 2 (one process per node, rendezvous on localhost, gloo), DDP, rank 1's first batch
    text-only: the same adapter as 1 process; peaks of both ranks logged."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = _text_first_recipe(tmp_path, "nodes", "ddp")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "vlm_lora", "finetune", str(recipe)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    _check_memory_rows(tmp_path / "nodes", errors[0], ranks=2)
    ours, theirs = _adapter(tmp_path / "nodes"), _adapter(one_process_text_first)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0, msg=key)
