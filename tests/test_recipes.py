"""Every shipped recipe validates; bad recipes fail with every bad key named at once."""

from pathlib import Path

import pytest
import yaml

from vlm_lora.recipe import RecipeError, apply_overrides, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
ACCELERATE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.output_dir.startswith("runs/")


def test_quickstart_keeps_the_documented_shape(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # its data and model paths exist from the repo root
    recipe = load_recipe("recipes/quickstart.yaml", check_paths=True)
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
                     "train.batch_sise: unknown key; did you mean 'batch_size'? valid keys here: epochs, max_steps",
                     "train.lr_scheduler: Input should be 'cosine', 'linear' or 'constant'",
                     "train.learning_rate: Input should be greater than 0",
                     "components.language_decoder.mode: Input should be 'lora', 'full' or 'frozen'",
                     "components.language_decoder.rnk: unknown key; did you mean 'rank'? valid keys here: mode, rank",
                     "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"]:
        assert expected in message, expected
    assert message.count("batch_sise") == 1  # each problem once


def test_unknown_names_suggest_the_nearest_valid_one():
    bad = _minimal()
    bad["strategy"] = "langauge_only"
    bad["components"] = {"langauge_decoder": {"mode": "lora"}, "vision_encoder": {"mode": "frozen"}, "zzz": {}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(bad)
    message = str(info.value)
    assert message.startswith("recipe has 3 error(s)")
    for expected in ["strategy: unknown strategy 'langauge_only'; did you mean 'language_only'? valid: language_only,",
                     "components.langauge_decoder: unknown component; did you mean 'language_decoder'? "
                     "valid: vision_encoder,",
                     "components.zzz: unknown component; valid: vision_encoder,"]:
        assert expected in message, expected
    assert "did you mean" not in message.split("components.zzz")[1]


def test_missing_paths_are_recipe_errors_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    recipe = {"model": {"path": "./no-model"}, "data": {"train": "train.jsonl", "eval": "missing/eval.jsonl"},
              "train": {"batch_sise": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "error(s)" in str(info.value) and "not found" not in str(info.value)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, check_paths=True)
    message = str(info.value)
    assert message.startswith("recipe has 3 error(s)")
    assert "data.eval: file not found: missing/eval.jsonl" in message
    assert "model.path: folder not found: ./no-model" in message
    assert "data.train" not in message
    recipe.pop("train")
    recipe["model"]["path"] = "org/hub-model"  # a hub id is never checked
    recipe["data"]["eval"] = None
    assert validate_recipe(recipe, check_paths=True).data.train == "train.jsonl"
    recipe["data"]["train"] = "gone.jsonl"
    with pytest.raises(RecipeError, match=r"recipe has 1 error\(s\):\n  - data.train: file not found: gone.jsonl"):
        validate_recipe(recipe, check_paths=True)


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


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_configs_load(name):
    path = ACCELERATE / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["num_processes"] == 2 and data["num_machines"] == 1 and data["mixed_precision"] == "bf16"
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # fails on keys accelerate does not know
    assert config.num_processes == 2 and config.mixed_precision == "bf16"
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}[name]


def test_fsdp_config_reaches_accelerates_plugin():
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    from types import SimpleNamespace

    from vlm_lora.train.loop import _plugin_wrap_classes

    fsdp = yaml.safe_load((ACCELERATE / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / "fsdp.yaml"), "-m", "vlm_lora"])
    args, _, _ = _validate_launch_command(args)
    with patch_environment(**prepare_multi_gpu_env(args)):  # what `accelerate launch` gives the processes
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    # the loop shards with these units (it reads nothing else of the plugin)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    assert _plugin_wrap_classes(accelerator) == ("LlamaDecoderLayer", "CLIPEncoderLayer")


def test_set_value_that_is_not_yaml_is_one_clear_error():
    with pytest.raises(RecipeError, match=r"--set 'data.prompt=\{label\} stain': the value is not valid YAML.*quote it"):
        apply_overrides(_minimal(), ["data.prompt={label} stain"])


def test_a_misspelt_metric_for_best_fails_before_the_model_loads():
    bad = _minimal()
    bad["train"] = {"metric_for_best": "cidr", "learning_rate": -1}
    with pytest.raises(RecipeError) as info:
        validate_recipe(bad)
    message = str(info.value)
    assert message.startswith("recipe has 2 error(s)")  # collected with the other errors
    assert "train.metric_for_best: unknown metric 'cidr'; did you mean 'cider'? valid: accuracy, anls, bleu1" in message
    good = _minimal()
    good["train"] = {"metric_for_best": "eval_loss"}
    assert validate_recipe(good).train.metric_for_best == "eval_loss"


def test_padding_auto_means_64_on_cuda_and_none_on_cpu_or_packed():
    from vlm_lora.data.processors import length_multiple

    data = validate_recipe(_minimal()).data
    assert data.pad_to_multiple_of == "auto"
    assert length_multiple(data, cuda=True) == 64 and length_multiple(data, cuda=False) is None
    assert length_multiple(data.model_copy(update={"packing": True}), cuda=True) is None
    assert length_multiple(data.model_copy(update={"pad_to_multiple_of": None}), cuda=True) is None
    assert length_multiple(data.model_copy(update={"pad_to_multiple_of": 8}), cuda=False) == 8


def test_batched_vision_attention_takes_auto_or_a_switch_with_one_message():
    recipe = _minimal()
    assert validate_recipe(recipe).train.batched_vision_attention == "auto"
    for value, expected in [(True, True), ("false", False), ("auto", "auto")]:
        recipe["train"] = {"batched_vision_attention": value}
        assert validate_recipe(recipe).train.batched_vision_attention == expected
    recipe["train"] = {"batched_vision_attention": "maybe"}
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert "recipe has 1 error(s)" in str(info.value)
    assert "train.batched_vision_attention: expected auto, true or false (got 'maybe')" in str(info.value)


def test_padding_to_a_multiple_is_checked_and_refused_with_packing():
    recipe = _minimal()
    recipe["data"] = {**recipe.get("data", {}), "pad_to_multiple_of": 64}
    assert validate_recipe(recipe).data.pad_to_multiple_of == 64
    recipe["data"].update(pad_to_multiple_of=0, packing=True)
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert "data.pad_to_multiple_of: expected a positive number of tokens, auto or null (got 0)" in str(info.value)
    recipe["data"]["pad_to_multiple_of"] = "sixty"
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert "recipe has 1 error(s)" in str(info.value) and "(got 'sixty')" in str(info.value)
    recipe["data"]["pad_to_multiple_of"] = "auto"  # the default: no padding for packed rows, no error
    assert validate_recipe(recipe).data.pad_to_multiple_of == "auto"
    recipe["data"]["pad_to_multiple_of"] = 64
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert "data.pad_to_multiple_of: packed rows are not padded per batch" in str(info.value)
