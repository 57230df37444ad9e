"""Runs users can trust: exact resume after SIGKILL, DDP == accumulation, NaN stop, overwrite guard,
token-weighted accumulation, gradient checkpointing."""

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

from conftest import ASSET_DATA, ASSET_MODEL, REPO

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, name: str, dropout: float = 0.1, **train) -> Path:
    """The quickstart on 32 microscopy rows, no eval, small batches: seconds per run."""
    rows = (ASSET_DATA / "microscopy" / "train.jsonl").read_text().splitlines()[:32]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({**json.loads(r), "image": str(ASSET_DATA / "microscopy" /
                                                                          json.loads(r)["image"])}) for r in rows) + "\n")
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["path"] = str(ASSET_MODEL)
    recipe["data"] = {"train": str(data)}
    recipe["components"]["language_decoder"]["dropout"] = dropout  # resume must restore the dropout RNG too
    recipe["train"].update({"batch_size": 4, "max_steps": 8, "save_steps": 2, "eval_steps": None, "log_steps": 1,
                            "warmup_steps": 2, "save_total_limit": 10, **train})
    recipe["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "vlm_lora", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def _adapter(run: Path, name: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(run / name / "adapter_model.safetensors")


def test_killed_run_resumes_bit_identical(tmp_path):
    full = _cli("finetune", str(_recipe(tmp_path, "full")))
    assert full.returncode == 0, full.stderr[-2000:]

    recipe = _recipe(tmp_path, "killed")
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlm_lora", "finetune", str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "checkpoint-4" / "trainer_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter_last").exists(), "the run finished before it could be killed"
    resumed = _cli("finetune", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr

    expected, got = _adapter(tmp_path / "full"), _adapter(run)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    losses = lambda r: {m["step"]: m["loss"] for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())}
    assert losses(run)[8] == losses(tmp_path / "full")[8]


def test_two_processes_match_one_process_with_doubled_accumulation(tmp_path):
    # no dropout: each process draws its own dropout masks, which one process would draw in sequence
    one = _cli("finetune", str(_recipe(tmp_path, "one", dropout=0.0, grad_accum=2, max_steps=3, save_steps=None)))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlm_lora",
                          "finetune", str(_recipe(tmp_path, "two", dropout=0.0, grad_accum=1, max_steps=3, save_steps=None))],
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    # same micro-batches per step, token-weighted: equal up to float reduction order (gloo all-reduce)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4)
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros(1))


def test_accumulation_is_weighted_by_tokens(tmp_path):
    """Two micro-batches of 4 with accumulation equal one batch of 8 (the same samples)."""
    small = _cli("finetune", str(_recipe(tmp_path, "small", dropout=0.0, grad_accum=2, max_steps=2, save_steps=None)))
    big = _cli("finetune", str(_recipe(tmp_path, "big", dropout=0.0, batch_size=8, max_steps=2, save_steps=None)))
    assert small.returncode == 0 and big.returncode == 0, small.stderr[-2000:] + big.stderr[-2000:]
    a, b = _adapter(tmp_path / "small"), _adapter(tmp_path / "big")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = _cli("finetune", str(_recipe(tmp_path, "nan", learning_rate=1.0e6, max_grad_norm=None)))
    assert result.returncode == 2
    assert "training diverged at step" in result.stderr
    run = tmp_path / "nan"
    assert not (run / "adapter").exists()
    for checkpoint in run.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapter_model.safetensors").values())


def test_finished_run_is_not_overwritten(tmp_path):
    recipe = _recipe(tmp_path, "done", max_steps=1, save_steps=None)
    assert _cli("finetune", str(recipe)).returncode == 0
    again = _cli("finetune", str(recipe))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _cli("finetune", str(recipe), "--overwrite").returncode == 0
    nothing = _cli("finetune", str(_recipe(tmp_path, "fresh")), "--resume")
    assert nothing.returncode == 2 and "no checkpoint" in nothing.stderr


@pytest.mark.parametrize("factory", ["llava", "blip2_opt"])
def test_gradient_checkpointing_gives_the_same_gradients(factory):
    import vlm_lora
    from vlm_lora.architectures.tiny_models import FACTORIES
    from vlm_lora.train.speed import enable_gradient_checkpointing as _enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = FACTORIES[factory]()
        vlm_lora.plan(model, "both" if factory == "llava" else "cross_attention",
                      **({"language_decoder": {"mode": "lora", "rank": 4}} if factory != "llava" else {})).apply(model)
        model.train()
        if checkpointing:
            _enable_gradient_checkpointing(model)
        torch.manual_seed(0)
        if factory == "llava":
            ids = torch.randint(1, 60, (2, 10))
            ids[:, 1:5] = model.config.image_token_id
            batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16), "labels": ids.clone()}
        else:
            n_query = model.config.num_query_tokens
            ids = torch.randint(4, 60, (2, n_query + 6))
            ids[:, :n_query] = model.config.image_token_index
            batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16), "labels": ids.clone()}
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert any(".lora_A." in n for n in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_quickstart_runs_on_a_4bit_base(tmp_path):
    """`--set model.quantization.bits=4`: NF4 language decoder on CPU (bitsandbytes), LoRA on top, and
    the adapter merges into the dequantized weights it was trained against."""
    pytest.importorskip("bitsandbytes")
    recipe = _recipe(tmp_path, "qlora", dropout=0.0, max_steps=3, save_steps=None)
    result = _cli("finetune", str(recipe), "--set", "model.quantization.bits=4",
                  "--set", "model.quantization.compute_dtype=float32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "QLoRA: 28 linears of language_decoder in 4-bit nf4" in result.stderr
    meta = json.loads((tmp_path / "qlora" / "adapter" / "vlm_lora.json").read_text())
    assert meta["quantization"]["bits"] == 4
    merged = _cli("merge", "--base", str(ASSET_MODEL), "--adapter", str(tmp_path / "qlora" / "adapter"),
                  "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads(merged.stdout.strip().splitlines()[-1])["max_logit_diff"] < 1e-3
    bad = _cli("finetune", str(_recipe(tmp_path, "pissa", max_steps=1)), "--set", "model.quantization.bits=4",
               "--set", "components.language_decoder.init=pissa")
    assert bad.returncode == 2 and "pissa needs a full-precision base" in bad.stderr


def test_a_deferred_divergence_check_stops_where_a_per_step_check_does(tmp_path):
    """log_steps 1 reads the loss every step; log_steps 8 lets the device record the first bad step and reads
    it before the next save: the same step is named and the same (finite) checkpoints are on disk."""
    results, kept = {}, {}
    for log_steps in (1, 8):
        name = f"nan_every_{log_steps}"
        result = _cli("finetune", str(_recipe(tmp_path, name, learning_rate=1.0e6, max_grad_norm=None,
                                              log_steps=log_steps, save_steps=3)))
        assert result.returncode == 2, result.stderr[-2000:]
        results[log_steps] = result.stderr[result.stderr.index("training diverged at step"):].split(";")[0]
        kept[log_steps] = sorted(p.name for p in (tmp_path / name).glob("checkpoint-*"))
    assert results[1] == results[8], results
    assert kept[1] == kept[8], kept


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Reading a tensor on the host (.item(), bool(), float()) makes the host wait for the GPU; the step (loop,
    task, loss) does it only at log steps: 2 and 6 steps with one log each make the same number of reads."""
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train.loop import finetune

    step_files = {str(REPO / "vlm_lora" / "train" / f) for f in ("loop.py", "tasks.py", "loss.py", "guard.py")}
    reads = []

    def counting(original):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename in step_files:
                reads.append(original.__name__)
            return original(self, *args, **kwargs)
        return read

    for method in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, counting(getattr(torch.Tensor, method)))
    counts = {}
    for steps in (2, 6):
        before = len(reads)
        finetune(load_recipe(_recipe(tmp_path, f"steps_{steps}", max_steps=steps, log_steps=steps, save_steps=None)))
        counts[steps] = len(reads) - before
    assert counts[2] == counts[6] and counts[2] > 0, counts  # > 0: the log step's reads are seen


def test_the_training_loader_hands_the_labelled_head_its_positions(tmp_path, monkeypatch):
    """The answer positions come with every training batch, found on the CPU (on CUDA, finding them in the
    step is a nonzero that makes the host wait for the GPU), and they are the batch's own."""
    from vlm_lora.data.labelled import LABELLED_POSITIONS, labelled_positions
    from vlm_lora.recipe import load_recipe
    from vlm_lora.train import tasks
    from vlm_lora.train.loop import finetune

    batches = []
    original = tasks.labelled_token_loss

    def spy(model, batch, **kwargs):
        batches.append(batch)
        return original(model, batch, **kwargs)

    monkeypatch.setattr(tasks, "labelled_token_loss", spy)
    finetune(load_recipe(_recipe(tmp_path, "positions", max_steps=3, log_steps=3, save_steps=None)))
    assert len(batches) == 3
    for batch in batches:
        assert torch.equal(batch[LABELLED_POSITIONS], labelled_positions(batch["labels"]))


def test_an_adalora_run_resumes_exactly(tmp_path):
    """AdaLoRA's budget masks come from importance averages over every step: a resumed run must restore
    them (checkpointed in vlm_lora_state.safetensors), or its masks, and so its adapter, drift."""
    adalora = {"variant": "adalora", "rank": 4, "dropout": 0.0,
               "adalora": {"target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1}}
    paths = {}
    for name in ("full", "cut"):
        path = _recipe(tmp_path, name, dropout=0.0, max_steps=8, save_steps=4, log_steps=1)
        recipe = yaml.safe_load(path.read_text())
        recipe["components"]["language_decoder"].update(adalora)
        path.write_text(yaml.safe_dump(recipe))
        paths[name] = path
        done = _cli("finetune", str(path))
        assert done.returncode == 0, done.stderr[-2000:]
    cut = tmp_path / "cut"  # as if killed after checkpoint-4: everything later is gone
    for later in ("adapter", "adapter_last", "checkpoint-6"):
        if (cut / later).exists():
            import shutil
            shutil.rmtree(cut / later)
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in (cut / "metrics.jsonl").read_text().splitlines()
                                               if json.loads(line).get("step", 0) <= 4))
    resumed = _cli("finetune", str(paths["cut"]), "--resume")
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    expected, got = _adapter(tmp_path / "full"), _adapter(cut)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
