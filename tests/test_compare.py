"""`vlm-lora compare`: the same recipe trained with several variants, one table and one plot."""

import json

import yaml

from conftest import ASSET_DATA, ASSET_MODEL


def test_compare_two_variants_writes_table_and_plot(tmp_path):
    from vlm_lora.cli import main

    rows = [json.loads(l) for l in (ASSET_DATA / "microscopy" / "eval.jsonl").read_text().splitlines()[:4]]
    for row in rows:
        row["image"] = str(ASSET_DATA / "microscopy" / row["image"])
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = yaml.safe_load((ASSET_MODEL.parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": str(ASSET_DATA / "microscopy" / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")}
    recipe["components"]["language_decoder"].update(rank=4, targets=["q", "v"])
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compare", str(tmp_path / "r.yaml"), "--variants", "lora,vera", "--steps", "2",
                 "--set", "train.batch_size=4", "--set", "train.max_new_tokens=4"]) == 0
    out = tmp_path / "run" / "compare"
    table = json.loads((out / "compare.json").read_text())
    assert [r["variant"] for r in table] == ["lora", "vera"]
    lora, vera = table
    assert vera["trainable_params"] < lora["trainable_params"]  # same connector, VeRA's d, b instead of A, B
    assert all(r["metric"] == "cider" and r["eval"] is not None and r["step_time_s"] > 0 for r in table)
    assert "| vera |" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0
    config = json.loads((out / "vera" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA"
    assert main(["compare", str(tmp_path / "r.yaml"), "--variants", "lora,loha", "--steps", "2"]) == 2
