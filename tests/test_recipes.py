"""Every shipped recipe validates; bad recipes fail with every bad key named at once."""

from pathlib import Path

import pytest
import yaml

from vlm_lora.recipe import RecipeError, apply_overrides, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.output_dir.startswith("runs/")


def test_quickstart_keeps_the_documented_shape():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert recipe.model.path == "assets/tiny-llava"
    assert recipe.components["language_decoder"].mode == "lora"
    assert recipe.components["connector"].mode == "full"
    assert recipe.data.train.endswith("microscopy/train.jsonl")


def _minimal():
    return {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}


def test_all_errors_reported_once_with_keys_and_options():
    bad = _minimal()
    bad["strategy"] = "everything"
    bad["train"] = {"batch_sise": 4, "lr_scheduler": "step", "learning_rate": -1}
    bad["components"] = {"language_decoder": {"mode": "qlora", "rnk": 3}}
    bad["model"]["dtype"] = "int3"
    with pytest.raises(RecipeError) as info:
        validate_recipe(bad)
    message = str(info.value)
    assert message.startswith("recipe has 7 error(s)")
    for expected in ["strategy: unknown strategy 'everything'; valid: language_only",
                     "train.batch_sise: unknown key; valid keys here: epochs, max_steps, batch_size",
                     "train.lr_scheduler: Input should be 'cosine', 'linear' or 'constant'",
                     "train.learning_rate: Input should be greater than 0",
                     "components.language_decoder.mode: Input should be 'lora', 'full' or 'frozen'",
                     "components.language_decoder.rnk: unknown key; valid keys here: mode, rank, alpha",
                     "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"]:
        assert expected in message, expected


def test_missing_required_keys_are_named():
    with pytest.raises(RecipeError, match="model: required key is missing"):
        validate_recipe({"data": {"train": "x"}})


def test_set_overrides_parse_yaml_scalars(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    recipe = load_recipe(path, ["train.learning_rate=1e-3", "train.max_steps=7", "components.connector.mode=full",
                                "components.language_decoder.targets=[q, v]", "train.eval_base=false"])
    assert recipe.train.learning_rate == 1e-3 and recipe.train.max_steps == 7
    assert recipe.components["language_decoder"].targets == ["q", "v"]
    assert recipe.train.eval_base is False
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(RecipeError, match="train.max_step: unknown key"):
        load_recipe(path, ["train.max_step=3"])


def test_unreadable_recipes(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
