"""The DataLoader path: a parquet copy with 2 workers gives the adapter of the JSONL in-process,
a run killed mid-epoch resumes exactly with workers, streamed shards train, length grouping is seeded."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ASSET_MODEL, REPO
from test_data_sources import microscopy_rows, write_jsonl, write_parquet, write_shards
from vlm_lora.data.loader import BatchStream, micro_batches

pytestmark = pytest.mark.slow
ROWS = 16


def _recipe(tmp_path: Path, name: str, train: str, workers: int, **train_cfg) -> Path:
    """The quickstart on 16 microscopy rows, batch 4, 4 steps (a little over an epoch: 4 micro-batches each)."""
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": train, "num_workers": workers}
    recipe["components"]["language_decoder"]["dropout"] = 0.1  # workers must not touch the main process's RNG
    recipe["train"].update({"batch_size": 4, "max_steps": 6, "save_steps": 2, "eval_steps": None, "log_steps": 1,
                            "warmup_steps": 1, "save_total_limit": 10, **train_cfg})
    recipe["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(recipe: Path, *flags) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vlm_lora", "finetune", str(recipe), *flags], capture_output=True,
                            text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference runs: the JSONL in-process (0 workers), its parquet copy with 2 workers."""
    tmp = tmp_path_factory.mktemp("runs")
    rows = microscopy_rows(ROWS)
    parquet = str(write_parquet(tmp / "d.parquet", rows))
    _run(_recipe(tmp, "jsonl_w0", str(write_jsonl(tmp / "d.jsonl", rows)), 0))
    _run(_recipe(tmp, "parquet_w2", parquet, 2))
    return tmp, parquet


def test_parquet_with_two_workers_trains_like_its_jsonl_copy_in_process(runs):
    """Bit-identical adapters: the parquet rows are the JSONL's (batches: test_data_sources) and 2 loader
    workers give the in-process batches."""
    tmp, _ = runs
    _assert_equal(_adapter(tmp / "jsonl_w0"), _adapter(tmp / "parquet_w2"))
    losses = [json.loads(line)["loss"] for line in (tmp / "parquet_w2" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_killed_run_resumes_bit_identical_with_workers(runs):
    tmp, parquet = runs
    recipe = _recipe(tmp, "killed", parquet, 2)
    run = tmp / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlm_lora", "finetune", str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoint-2" / "trainer_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers, mid-epoch (step 2 of 4 per epoch)
    proc.wait()
    assert not (run / "adapter_last").exists(), "the run finished before it could be killed"
    resumed = _run(recipe, "--resume")
    assert "resuming from" in resumed.stderr
    _assert_equal(_adapter(tmp / "parquet_w2"), _adapter(run))


def test_streamed_shards_train_and_checkpoint_their_layout(tmp_path):
    """A streamed run end to end (its order, split and resume: test_data_sources)."""
    pattern = write_shards(tmp_path / "shards", microscopy_rows(ROWS), per_shard=4)
    recipe = _recipe(tmp_path, "stream", pattern, 2, max_steps=3, save_steps=2)
    _run(recipe)
    state = torch.load(tmp_path / "stream" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["position"]["micro_batches"] == 2 and state["position"]["data"] == {"workers": 2, "world": 1}


def test_length_grouping_is_a_seeded_permutation_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    grouped = micro_batches(1000, 8, seed=1, epoch=0, lengths=lengths)
    plain = micro_batches(1000, 8, seed=1, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == micro_batches(1000, 8, seed=1, epoch=0, lengths=lengths)
    assert grouped != micro_batches(1000, 8, seed=1, epoch=1, lengths=lengths)
    padding = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(grouped) < padding(plain) / 5
    stream = BatchStream(1000, 8, seed=1, lengths=lengths)
    assert stream.take(3) == grouped[:3] and stream.batch(125) == micro_batches(1000, 8, 1, 1, lengths)[0]
