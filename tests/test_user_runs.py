"""What users hit (issue 20): eval on chat data, reused output folders, eval on the train split, fp16 runs,
an eval crash after training, a damaged checkpoint, and the clear errors that replace tracebacks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ASSET_DATA, ASSET_MODEL, REPO
from vlm_lora.recipe import load_recipe, validate_recipe
from vlm_lora.train import finetune
from vlm_lora.train.setup import RunExistsError, TrainingError

MICRO = ASSET_DATA / "microscopy"


def _rows(n: int, start: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (MICRO / "train.jsonl").read_text().splitlines()[start:start + n]]
    return [{**r, "image": str(MICRO / r["image"])} for r in rows]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, name: str = "run", eval_rows: int = 0, **train) -> dict:
    """The quickstart on 8 rows, tiny batches, no eval unless ``eval_rows``."""
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": str(_write_jsonl(tmp_path / "train.jsonl", _rows(8))),
                      "eval": str(_write_jsonl(tmp_path / "eval.jsonl", _rows(eval_rows, 100))) if eval_rows else None}
    recipe["train"].update({"batch_size": 4, "max_steps": 2, "save_steps": None, "eval_steps": None, "log_steps": 1,
                            "warmup_steps": 0, "eval_base": False, "max_new_tokens": 4, "save_total_limit": 10,
                            **train})
    recipe["output_dir"] = str(tmp_path / name)
    return recipe


# ---------------------------------------------------------------- 1. eval on chat data

def test_eval_replays_the_conversation_up_to_its_last_user_turn(tmp_path):
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.eval.captioning import evaluate_captions
    from vlm_lora.modeling import load_model_and_processor

    image = str(MICRO / _rows(1)[0]["image"])
    records = [{"id": f"s{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat stain is it?"}, {"from": "gpt", "value": f"Stain {i}."},
        {"from": "human", "value": f"How many cells, {i}?"}, {"from": "gpt", "value": f"{i} cells."}]}
        for i in range(2)]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    data = load_dataset(tmp_path / "chat.json")
    model, processor = load_model_and_processor(str(ASSET_MODEL))
    metrics, rows = evaluate_captions(model, processor, data, "Describe the image.", batch_size=2, max_new_tokens=6)

    assert [r["prompt"] for r in rows] == [f"What stain is it?\nHow many cells, {i}?" for i in range(2)]
    assert [r["references"] for r in rows] == [[f"{i} cells."] for i in range(2)]  # the last turn's answer
    for i, row in enumerate(rows):  # reference: generate from the conversation built by hand
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What stain is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"Stain {i}."}]},
                    {"role": "user", "content": [{"type": "text", "text": f"How many cells, {i}?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert "Describe the image." not in text
        inputs = processor(images=[data[i][0]], text=[text], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["prediction"] == expected.strip()
    assert metrics["n"] == 2


def test_a_corrupt_eval_image_in_skip_mode_is_skipped_and_counted(tmp_path, caplog):
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.eval.captioning import evaluate_captions
    from vlm_lora.modeling import load_model_and_processor

    rows = _rows(3)
    bad = tmp_path / "bad.png"
    shutil.copy(rows[1]["image"], bad)
    rows[1]["image"] = str(bad)
    data = load_dataset(_write_jsonl(tmp_path / "eval.jsonl", rows), on_bad_sample="skip")
    bad.write_bytes(b"not a png any more")  # broken after the data set was checked, as in a long run
    model, processor = load_model_and_processor(str(ASSET_MODEL))
    metrics, predictions = evaluate_captions(model, processor, data, "Describe the image.", max_new_tokens=4)
    assert metrics["n"] == 2 and metrics["skipped"] == 1
    assert predictions[1]["skipped"] and predictions[1]["prediction"] is None
    assert all(isinstance(p["prediction"], str) for p in (predictions[0], predictions[2]))
    from vlm_lora.eval.captioning import score_prediction_file, write_predictions

    write_predictions(predictions, tmp_path / "predictions.jsonl")  # `vlm-lora score` reads it back
    assert score_prediction_file(tmp_path / "predictions.jsonl") == {k: v for k, v in metrics.items() if k != "skipped"}


# ---------------------------------------------------------------- 2. output_dir holds another run

def _fake_checkpoint(out: Path, step: int) -> Path:
    from safetensors.torch import save_file

    from vlm_lora.train.checkpoint import save_checkpoint

    def write_adapter(folder: Path) -> None:
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))

    return save_checkpoint(out, step, write_adapter, {"optimizer": {}}, None)


def test_a_folder_holding_a_run_is_refused_and_resume_needs_the_same_recipe(tmp_path):
    from vlm_lora.train.output_dir import prepare_output_dir, resume_point

    data = _recipe(tmp_path)
    out = Path(data["output_dir"])
    recipe = validate_recipe(data)
    prepare_output_dir(out, yaml.safe_dump(recipe.model_dump(mode="json")), clear=False)
    with pytest.raises(RunExistsError, match="recipe.resolved.yaml"):  # an unfinished run: recipe only
        resume_point(out, recipe, resume=False, overwrite=False)
    _fake_checkpoint(out, 2)
    with pytest.raises(RunExistsError, match="checkpoint-2.*--overwrite"):
        resume_point(out, recipe, resume=False, overwrite=False)

    longer = validate_recipe({**data, "train": {**data["train"], "max_steps": 9, "log_steps": 3}})
    assert resume_point(out, longer, resume=True, overwrite=False) == out / "checkpoint-2"
    other = validate_recipe({**data, "train": {**data["train"], "learning_rate": 1e-4, "seed": 3}})
    with pytest.raises(RunExistsError) as error:
        resume_point(out, other, resume=True, overwrite=False)
    assert "train.learning_rate: 0.002 -> 0.0001" in str(error.value) and "train.seed: 0 -> 3" in str(error.value)

    assert resume_point(out, other, resume=False, overwrite=True) is None
    prepare_output_dir(out, "x: 1\n", clear=True)  # --overwrite: the old run's checkpoints go first
    assert not list(out.glob("checkpoint-*")) and (out / "recipe.resolved.yaml").read_text() == "x: 1\n"


def test_an_output_dir_that_cannot_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    data = _recipe(tmp_path, name="file/run")
    with pytest.raises(TrainingError, match=r"output_dir .*file/run: cannot write there"):
        finetune(validate_recipe(data))


# ---------------------------------------------------------------- 3. eval on the train split

def test_eval_split_defaults_to_validation_and_the_train_rows_are_refused(tmp_path):
    import datasets

    from vlm_lora.train.setup import eval_split

    table = {"image": [str(MICRO / _rows(1)[0]["image"])] * 2, "caption": ["a", "b"]}
    datasets.DatasetDict({s: datasets.Dataset.from_dict(table) for s in ("train", "validation", "test")}
                         ).save_to_disk(str(tmp_path / "dd"))
    base = {"model": {"path": "m"}, "data": {"train": str(tmp_path / "dd"), "eval": str(tmp_path / "dd")}}
    assert eval_split(validate_recipe(base)) == "validation"
    assert eval_split(validate_recipe({**base, "data": {**base["data"], "eval_split": "test"}})) == "test"
    same = validate_recipe({**base, "data": {**base["data"], "eval_split": "train"}})
    with pytest.raises(Exception, match=r"data.eval .*data.eval_split.*data.train .*data.split"):
        eval_split(same)
    jsonl = str(_write_jsonl(tmp_path / "rows.jsonl", _rows(2)))
    with pytest.raises(Exception, match="is the training data"):
        eval_split(validate_recipe({"model": {"path": "m"}, "data": {"train": jsonl, "eval": jsonl}}))


# ---------------------------------------------------------------- 7. fp16

def test_fp16_loss_scaling_keeps_gradients_that_fp16_would_flush_to_zero():
    from vlm_lora.train.precision import LossScaling

    grads = []
    for enabled in (False, True):
        layer = torch.nn.Linear(8, 8)  # fp32 master weights
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
        scaling = LossScaling(enabled, "cpu")
        with torch.autocast("cpu", dtype=torch.float16):  # fp16 compute in both runs
            loss = layer(torch.ones(4, 8)).float().sum() * 1e-9  # per-element grads ~1e-9: below fp16's range
        scaling.scale(loss).backward()
        scaling.unscale(optimizer)
        grads.append(layer.weight.grad.clone())
        scaling.step(optimizer)
    assert torch.count_nonzero(grads[0]) == 0  # unscaled fp16 backward flushes them
    torch.testing.assert_close(grads[1], torch.full((8, 8), 4e-9), rtol=1e-2, atol=0)


def test_fp16_weights_train_as_amp_and_bf16_autocast_over_them_is_refused():
    from vlm_lora.train.precision import uses_fp16_amp

    assert uses_fp16_amp("float16", "auto") and uses_fp16_amp("float32", "fp16")
    assert not uses_fp16_amp("float32", "auto") and not uses_fp16_amp("bfloat16", "bf16")
    with pytest.raises(TrainingError, match="model.dtype float16.*bf16"):
        uses_fp16_amp("float16", "bf16")


def test_fp16_run_trains_fp32_weights_with_a_finite_loss(tmp_path, caplog):
    data = _recipe(tmp_path, max_steps=3, save_steps=2)
    data["model"]["dtype"] = "float16"
    with caplog.at_level(logging.INFO, logger="vlm_lora"):
        finetune(validate_recipe(data))
    assert "fp16 mixed precision: 4 trainable tensors kept in fp32" in caplog.text
    run = Path(data["output_dir"])
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    connector = {k: v for k, v in saved.items() if "multi_modal_projector" in k}
    assert connector and all(v.dtype == torch.float32 for v in saved.values())  # master weights, not fp16
    scaler = torch.load(run / "checkpoint-2" / "trainer_state.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 1.0  # the loss was scaled (and a resume restores the scale)


def test_the_divergence_message_suggests_only_what_exists(tmp_path):
    from vlm_lora.train.precision import divergence_error

    recipe = validate_recipe({**_recipe(tmp_path), "train": {"max_grad_norm": None}})
    message = divergence_error(tmp_path, 0, "loss nan", recipe)
    assert "No checkpoint was written" in message and "--resume" not in message
    assert "set train.max_grad_norm" in message
    _fake_checkpoint(tmp_path, 4)
    assert "checkpoint-4" in divergence_error(tmp_path, 5, "loss nan", recipe)


# ---------------------------------------------------------------- 8. the adapter outlives an eval crash

@pytest.mark.parametrize("when", ["final", "periodic"])
def test_an_eval_crash_keeps_the_trained_adapter(tmp_path, monkeypatch, when):
    from vlm_lora.train import tasks

    run = tmp_path / "run"
    saved_before = []

    def broken(self, model, dataset, desc="eval"):
        saved_before.append((run / "adapter_last" / "adapter_model.safetensors").is_file())
        raise RuntimeError("N must be divisible by block_n")

    monkeypatch.setattr(tasks.CaptionTask, "evaluate", broken)
    data = _recipe(tmp_path, eval_rows=2, eval_steps=2 if when == "periodic" else None)
    with pytest.raises(TrainingError, match="eval.* failed .*block_n.*the trained adapter is saved"):
        finetune(validate_recipe(data))
    assert saved_before == [True]  # the last step's eval ran with the adapter already on disk
    for name in ("adapter", "adapter_last"):
        assert (run / name / "adapter_model.safetensors").is_file(), name


# ---------------------------------------------------------------- 9. damaged checkpoint + metrics rows on resume

def test_resume_passes_over_a_damaged_checkpoint_and_drops_repeated_metrics_rows(tmp_path, caplog):
    data = _recipe(tmp_path, max_steps=4, save_steps=1)
    finetune(validate_recipe(data))
    run = Path(data["output_dir"])
    reference = load_file(run / "adapter" / "adapter_model.safetensors")
    for name in ("adapter", "adapter_last", "checkpoint-3"):  # as if killed just after checkpoint-3 was written
        shutil.rmtree(run / name)
    state = run / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated: the newest checkpoint is damaged
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        finetune(validate_recipe(data), resume=True, overwrite=True)  # --resume wins: nothing is cleared
    assert "checkpoint-2 is damaged" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    for key in reference:  # continued from checkpoint-1 exactly
        assert torch.equal(reference[key], resumed[key]), key


# ---------------------------------------------------------------- small ones

def test_eval_checks_every_adapter_before_captioning_the_base(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from vlm_lora.adapters.peft_format import AdapterError
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.eval import captioning
    from vlm_lora.modeling import load_model_and_processor

    model, processor = load_model_and_processor(str(ASSET_MODEL))
    adapter = tmp_path / "bad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.no_such.layer.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.model.no_such.layer.lora_B.weight": torch.zeros(4, 2)},
              str(adapter / "adapter_model.safetensors"))
    calls = []
    monkeypatch.setattr(captioning, "generate_captions", lambda *a, **k: calls.append(1) or [])
    dataset = load_dataset(_write_jsonl(tmp_path / "gt.jsonl", _rows(1)))
    with pytest.raises(AdapterError, match="no_such"):
        captioning.compare_models(model, processor, dataset, [("mine", adapter)], "Describe the image.")
    assert calls == []  # failed before the base was captioned


def test_base_weights_load_from_safetensors_unless_allow_pickle(tmp_path):
    from vlm_lora.modeling import ModelPathError, load_model_and_processor

    folder = tmp_path / "pickled"
    shutil.copytree(ASSET_MODEL, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    torch.save(load_file(ASSET_MODEL / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelPathError, match="model.allow_pickle: true"):
        load_model_and_processor(str(folder))
    model, _ = load_model_and_processor(str(folder), allow_pickle=True)
    assert model is not None
    assert validate_recipe({"model": {"path": "m", "allow_pickle": True}, "data": {"train": "x"}}).model.allow_pickle


def test_eval_warnings_name_the_adapter_by_its_label(tmp_path, monkeypatch, caplog):
    import vlm_lora
    from vlm_lora.data.datasets import load_dataset
    from vlm_lora.eval import captioning
    from vlm_lora.modeling import load_model_and_processor

    model, processor = load_model_and_processor(str(ASSET_MODEL))
    plan = vlm_lora.plan(model, "language_only", vision_encoder={"mode": "full"})  # trains norms: not linears
    plan.apply(model)
    vlm_lora.save_adapter(model, tmp_path / "a", str(ASSET_MODEL), plan.full_prefixes(), never_saved=plan.frozen_paths)
    base, _ = load_model_and_processor(str(ASSET_MODEL))
    monkeypatch.setattr(captioning, "generate_captions_mixed", lambda m, p, d, names, *a, **k: [["x"]] * len(names))
    dataset = load_dataset(_write_jsonl(tmp_path / "gt.jsonl", _rows(1)))
    with caplog.at_level(logging.WARNING, logger="vlm_lora"):
        captioning.compare_models_mixed(base, processor, dataset, [("vision-run", tmp_path / "a")], "Describe it.")
    assert "adapter 'vision-run':" in caplog.text and "eval_1" not in caplog.text
