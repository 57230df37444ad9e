"""train.profile_steps: the chosen steps of a real run are recorded; out-of-range steps are refused up front."""

import json

import pytest
import torch
import yaml

from conftest import ASSET_DATA, ASSET_MODEL
from vlm_lora.recipe import RecipeError, load_recipe
from vlm_lora.train import finetune
from vlm_lora.train.profiling import StepProfiler, kernel_kind
from vlm_lora.train.setup import TrainingError


def _recipe_file(tmp_path):
    recipe = yaml.safe_load((ASSET_MODEL.parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": str(ASSET_DATA / "microscopy" / "train.jsonl")}
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["train"].update(eval_base=False, eval_steps=None, tensorboard=False, max_steps=4, log_steps=4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_profile_steps_records_the_chosen_steps_of_a_run(tmp_path):
    finetune(load_recipe(_recipe_file(tmp_path), ["train.profile_steps=[2,2]"]))
    folder = tmp_path / "run" / "profile"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == [2, 3] and summary["wall_ms"] > 0
    assert summary["launches"] == 0 and summary["busy"] == 0.0  # CPU: no kernels
    trace = json.loads((folder / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names  # the forward and backward are in the record
    assert "aten::mm" in (folder / "ops.txt").read_text() or "aten::addmm" in (folder / "ops.txt").read_text()


def test_profile_steps_beyond_the_run_are_refused_before_training(tmp_path):
    with pytest.raises(TrainingError, match=r"train.profile_steps: \[3, 4\] records up to step 6, but this run has 4"):
        finetune(load_recipe(_recipe_file(tmp_path), ["train.profile_steps=[3,4]"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    for value in ("[0,2]", "[2]", "5", "[1,2,3]"):
        with pytest.raises(RecipeError, match=r"train.profile_steps: expected \[first, count\]"):
            load_recipe(_recipe_file(tmp_path), [f"train.profile_steps={value}"])


def test_profiler_counts_only_its_steps():
    profiler = StepProfiler([5, 2], folder="unused", device=torch.device("cpu"))
    for step in range(1, 5):
        profiler.before(step)
        assert profiler._prof is None
    profiler = StepProfiler(None, folder="unused", device=torch.device("cpu"))
    profiler.before(0)
    assert profiler._prof is None and not profiler.enabled


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("void at::native::(anonymous namespace)::fused_adamw_kernel", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
])
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind
