"""Question answering and multiple choice end to end: rows, `eval --task`, `score --task`, report, training."""

import json

import pytest
import yaml

from conftest import ASSET_DATA, ASSET_MODEL, REPO
from vlm_lora.cli import main
from vlm_lora.data import DataError
from vlm_lora.data.datasets import load_dataset
from vlm_lora.data.qa import CHOICE_INSTRUCTION
from vlm_lora.eval.tasks import load_task_data
from vlm_lora.metrics import choice_accuracy, vqa_accuracy

GENERAL = ASSET_DATA / "general"


def _rows(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_rows_become_one_turn_samples(tmp_path):
    image = str(GENERAL / "images" / "eval_0000.png")
    path = _rows(tmp_path, "qa.jsonl", [
        {"image": image, "question": "What color are the squares?", "answers": ["red", "Red", "dark red"]},
        {"image": image, "question": "Which colour?", "options": ["blue", "red"], "answer": "B"},
        {"image": image, "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": "Three squares."},
            {"role": "user", "content": "How many squares?"}, {"role": "assistant", "content": "3"}],
         "options": ["2", "3"]}])
    qa, choice, chat = load_dataset(path).examples
    assert qa.turns == [("What color are the squares?", "red")] and qa.references == ["red", "Red", "dark red"]
    assert choice.turns[0] == (f"Which colour?\nA. blue\nB. red\n{CHOICE_INSTRUCTION}", "B")
    assert choice.question == "Which colour?" and choice.options == ["blue", "red"]
    assert chat.turns[-1] == ("How many squares?", "3") and chat.options == ["2", "3"]
    dataset = load_task_data(path, "vqa")
    from vlm_lora.eval.tasks import question_of
    assert [question_of(e) for e in dataset.examples] == ["What color are the squares?", "Which colour?",
                                                          "How many squares?"]
    with pytest.raises(DataError, match="line 1.*neither an option letter"):  # 'red' has no options
        load_task_data(_rows(tmp_path, "bad.jsonl", [{"image": image, "question": "q?", "answer": "red",
                                                       "options": ["blue", "green"]}]), "choice")
    with pytest.raises(DataError, match="line 1: a question row needs 'answer'"):
        load_dataset(_rows(tmp_path, "bad2.jsonl", [{"image": image, "question": "q?", "answers": []}]))
    with pytest.raises(DataError, match="COCO caption file has no questions"):
        load_task_data(tmp_path / "x.json", "vqa")


def test_eval_and_score_vqa_and_choice(tmp_path, capsys):
    out = tmp_path / "vqa"
    main(["eval", "--task", "vqa", "--model", str(ASSET_MODEL), "--data", str(GENERAL / "qa_eval.jsonl"),
          "--limit", "6", "--max-new-tokens", "6", "--out", str(out), "--contact-sheet", "0"])
    summary = json.loads((out / "summary.json").read_text())["base"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {"vqa_accuracy", "exact_match", "anls"} <= set(summary) and summary["n"] == 6
    predictions = [r["predictions"]["base"] for r in rows]
    mean, per_sample = vqa_accuracy(predictions, [r["answers"] for r in rows])
    assert summary["vqa_accuracy"] == pytest.approx(mean, abs=1e-9)
    assert [r["scores"]["base"] for r in rows] == pytest.approx(per_sample, abs=1e-9)
    page = (out / "report.html").read_text()
    assert "<th>question</th><th>answers</th>" in page and "VQA acc." in page
    assert rows[0]["question"] in page.replace("&#x27;", "'")
    capsys.readouterr()
    main(["score", "--task", "vqa", "--predictions", str(out / "predictions.jsonl")])
    rescored = json.loads(capsys.readouterr().out)["base"]
    assert rescored == {k: v for k, v in summary.items() if k != "speed"}

    single = tmp_path / "choice.json"
    main(["eval", "--task", "choice", "--model", str(ASSET_MODEL), "--data", str(GENERAL / "choice_eval.jsonl"),
          "--limit", "4", "--max-new-tokens", "4", "--out", str(single)])
    metrics = json.loads(single.read_text())
    rows = [json.loads(line) for line in single.with_suffix(".predictions.jsonl").read_text().splitlines()]
    expected = choice_accuracy([r["prediction"] for r in rows], [r["options"] for r in rows],
                               [r["answers"][0] for r in rows])
    assert metrics == {"choice_accuracy": pytest.approx(expected[0]), "n": 4}
    assert [r["score"] for r in rows] == expected[1]


def test_finetune_keeps_the_best_vqa_accuracy(tmp_path):
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train import finetune

    rows = [json.loads(line) for line in (GENERAL / "qa_eval.jsonl").read_text().splitlines()[:6]]
    for row in rows:
        row["image"] = str(GENERAL / row["image"])
    recipe = yaml.safe_load((REPO / "recipes" / "vqa_quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"].update(train=str(GENERAL / "qa_train.jsonl"), eval=str(_rows(tmp_path, "eval.jsonl", rows)))
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = finetune(load_recipe(tmp_path / "r.yaml", ["train.max_steps=4", "train.eval_steps=2",
                                                         "train.max_new_tokens=4", "train.eval_base=false"]))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval_vqa_accuracy"] for m in metrics if "eval_vqa_accuracy" in m}
    assert sorted(evals) == [2, 4]
    best = max(evals, key=lambda s: (evals[s], -s))
    assert result["adapted"]["best_step"] == best
    assert result["adapted"]["vqa_accuracy"] == pytest.approx(evals[best], abs=1e-9)
    assert {"exact_match", "anls"} <= set(result["adapted"])
    from vlm_lora.train.setup import TrainingError

    with pytest.raises(TrainingError, match="metric_for_best 'cider' is not a metric of data.task 'vqa'; valid: "
                                            "vqa_accuracy, exact_match, anls, eval_loss"):
        finetune(load_recipe(tmp_path / "r.yaml", ["train.metric_for_best=cider", "train.max_steps=1"]), overwrite=True)
