"""Training checkpoints: everything needed to continue a run exactly, written atomically.

``checkpoint-<step>/`` holds the adapter in PEFT format (usable on its own), the trainable
full modules (inside the adapter), and ``trainer_state.pt`` with optimizer, scheduler, the RNG
states of every rank and the data position. Under FSDP the caller gathers the adapter and the
optimizer state on all ranks first (``train.distributed``); only rank 0 calls ``save_checkpoint``. It is written to a temporary folder and renamed, so a run
killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from vlm_lora.lora import iter_lora_layers

STATE_NAME = "trainer_state.pt"
log = logging.getLogger("vlm_lora")


def rng_state() -> dict:
    """All RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_state(state: dict, rank: int) -> dict:
    """The RNG states of ``rank`` from a checkpoint (older checkpoints hold one state for all)."""
    rng = state["rng"]
    if isinstance(rng, dict):
        return rng
    if rank >= len(rng):
        raise ValueError(f"the checkpoint holds RNG states of {len(rng)} processes, this run has more; "
                         f"resume with the number of processes it was written with")
    return rng[rank]


def save_checkpoint(out_dir: Path, step: int, write_adapter, state: dict, keep: int | None) -> Path:
    """Write ``checkpoint-<step>`` atomically; ``write_adapter(folder)`` saves the adapter files and
    ``state`` (optimizer, scheduler, ``rng``: one entry per rank, position) goes to ``trainer_state.pt``.

    Keeps the newest ``keep`` checkpoints (all when None).
    """
    final = out_dir / f"checkpoint-{step}"
    temp = out_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(temp, ignore_errors=True)
    write_adapter(temp)
    torch.save({"step": step, **state}, temp / STATE_NAME)
    shutil.rmtree(final, ignore_errors=True)
    temp.rename(final)
    if keep:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)


def restore_weights(model, adapter_dir: Path) -> None:
    """Copy a saved adapter's tensors (and full modules) into the LoRA layers already in ``model``."""
    from safetensors.torch import load_file

    from vlm_lora.adapters.peft_format import PREFIX, WEIGHTS_NAME, lora_pairs, take_layer_entries
    from vlm_lora.adapters.peft_native import STATE_NAME, restore_training_state

    state = load_file(str(adapter_dir / WEIGHTS_NAME))
    own_form = adapter_dir / STATE_NAME  # VeRA/AdaLoRA layers, in vlm-lora's own names
    filled = restore_training_state(model, load_file(str(own_form))) if own_form.is_file() else set()
    pairs = lora_pairs(state)
    for path, layer in sorted(iter_lora_layers(model), key=lambda item: -len(item[0])):
        entries = take_layer_entries(pairs, path)
        if entries and path not in filled:
            layer.load_peft("default", entries)
    adapter_keys = (".lora_A", ".lora_B", ".lora_E", ".lora_magnitude_vector", ".vera_lambda_", "base_model.vera_")
    load_trainable(model, {k[len(PREFIX):]: v for k, v in state.items() if not any(t in k for t in adapter_keys)})


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def usable_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint whose files all read back; damaged newer ones (a truncated ``trainer_state.pt``
    or safetensors file) are named in a warning and passed over. Raises ``ValueError`` if none is usable."""
    from safetensors.torch import load_file

    from vlm_lora.adapters.peft_format import WEIGHTS_NAME

    found = list_checkpoints(out_dir)
    for checkpoint in reversed(found):
        try:
            load_trainer_state(checkpoint)
            load_file(str(checkpoint / WEIGHTS_NAME))
            return checkpoint
        except Exception as error:  # noqa: BLE001 - any failure to read it back means: damaged
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.warning("checkpoint %s is damaged (%s: %s); resuming from the previous complete checkpoint instead",
                        checkpoint, type(error).__name__, reason[:200])
    raise ValueError(f"--resume: none of the {len(found)} checkpoint(s) in {out_dir} can be read back "
                     f"(all damaged); start a new run (--overwrite)")
