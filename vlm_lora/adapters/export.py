"""Export adapters for serving engines (vLLM, SGLang) or as a merged transformers model.

``export(base, adapters, out, engine)`` with engine ``vllm`` / ``sglang`` writes

- ``OUT/base/``: the base with every update the engine cannot serve as LoRA merged in (fully-trained
  modules, DoRA, vision / connector LoRA unless kept, LoRA on ``lm_head``, cross-attention and all of
  Mllama's LoRA, fused ``nn.MultiheadAttention`` LoRA), as a complete folder (``folder.write_complete_folder``);
- ``OUT/adapter/`` (several adapters: ``OUT/adapters/<name>/``): a plain PEFT LoRA on the language model's
  linears: no ``modules_to_save``, one rank for all modules lifted to a rank the engine serves by
  zero-padding (exact), all scaling in ``lora_alpha`` (rsLoRA and per-module alphas folded: scale s =
  lora_alpha / r, the per-module ratio to the common s folded into B), transformers-5 module names
  (see ``engine_rules`` for why vLLM maps them to its own);
- ``OUT/serve.sh``: the engine's launch command.

Several adapters share one base only if they merge the same updates into it; otherwise it is an error
pointing to ``vlm-lora merge``. Every export is checked: the exported adapters pass ``check_adapter`` and
the merged base + served adapter reproduce the adapter model's logits on a probe input.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm_lora.adapters.engine_rules import (LANGUAGE, PISSA_INITS, TOWER, EngineRules, _is_head, check_adapter,
                                            engine_rules)
from vlm_lora.adapters.fingerprint import base_fingerprint, check_base, weight_config
from vlm_lora.adapters.folder import write_complete_folder
from vlm_lora.adapters.merge import (DeltaPart, _check_quantization, adapter_deltas, apply_trained_pixels, merge_adapter,
                                     probe_batch, refuse_other_weights)
from vlm_lora.adapters.peft_format import (CONFIG_NAME, META_NAME, PREFIX, WEIGHTS_NAME, AdapterError, _pattern_value,
                                           load_adapter, lora_pairs, read_adapter_config, read_meta)
from vlm_lora.lora import unload_lora
from vlm_lora.lora.mha import OUT_SUFFIX
from vlm_lora.lora.variants import lora_scaling

log = logging.getLogger("vlm_lora")

ENGINES_AND_TRANSFORMERS = ("vllm", "sglang", "transformers")


@dataclass
class ServedPair:
    """A LoRA pair the engine serves: A [r, in], B [out, r], its scale s (B A x s is the update)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


@dataclass
class EngineSplit:
    """One adapter cut for an engine: the pairs it serves and the updates merged into the base.

    served: PEFT target -> pair; merged: base parameter -> update; reasons: why -> names merged for it.
    """

    served: dict[str, ServedPair] = field(default_factory=dict)
    merged: dict[str, DeltaPart] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)


def _merge_reason(target: str, module: nn.Module | None, arch, config: dict, rules: EngineRules,
                  keep_tower: bool) -> str | None:
    """Why the LoRA pair on ``target`` must be merged into the base for ``rules``' engine; None to serve it."""
    title, family = rules.title, arch.name
    component = arch.component_of(target)
    if config.get("use_dora"):
        return f"DoRA: {title} serves plain LoRA only"
    if family in rules.no_lora_families:
        return f"{title} serves no LoRA for {family} models"
    if target.endswith(OUT_SUFFIX) or not isinstance(module, nn.Linear):
        return f"LoRA on a fused {type(module).__name__}: no PEFT linear {title} serves"
    if component == LANGUAGE and not _is_head(target):
        return None
    if component in TOWER:
        if keep_tower and rules.serves_tower(family):
            return None
        if rules.tower_flag is None:
            return f"vision-tower / connector LoRA: {title} adapts the language model only"
        if not rules.serves_tower(family):
            return f"vision-tower / connector LoRA: {title} serves none for {family}"
        return f"vision-tower / connector LoRA: {title} ignores it without {rules.tower_flag} (--keep-tower-lora)"
    if component == "lm_head" or _is_head(target):
        return f"LoRA on lm_head / embeddings: {title} fails to load it"
    return f"{component} LoRA: {title} serves the language model's linears only"


def split_for_engine(model: nn.Module, adapter_dir: str | Path, rules: EngineRules,
                     keep_tower: bool = False) -> EngineSplit:
    """Cut the PEFT adapter in ``adapter_dir`` into what ``rules``' engine serves and what goes into the base."""
    from vlm_lora.architectures.registry import detect_architecture

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if str(config.get("init_lora_weights")).lower() in PISSA_INITS:
        raise AdapterError(f"{adapter_dir}: init_lora_weights is {config['init_lora_weights']!r}, a PEFT adapter of "
                           f"a modified (residual) base; save it converted for the original base (PEFT's "
                           f"path_initial_model_for_weight_conversion) and export that")
    arch = detect_architecture(model)
    pairs = lora_pairs(load_file(str(adapter_dir / WEIGHTS_NAME)))
    modules = dict(model.named_modules())
    split = EngineSplit()
    for name, part in adapter_deltas(model, adapter_dir).items():
        if part.full:
            reason = f"trained in full (modules_to_save): {rules.title} loads LoRA pairs only"
        else:
            reason = _merge_reason(part.target, modules.get(part.target), arch, config, rules, keep_tower)
        if reason is None:
            lora_a, lora_b, _ = pairs[part.target]
            alpha = _pattern_value(part.target, config.get("alpha_pattern") or {}, config["lora_alpha"])
            scaling = lora_scaling(lora_a.shape[0], alpha, bool(config.get("use_rslora")))
            split.served[part.target] = ServedPair(lora_a.float(), lora_b.float(), scaling)
        else:
            split.merged[name] = part
            names = split.reasons.setdefault(reason, [])
            module = part.target or name.rsplit(".", 1)[0]  # a fully-trained weight and bias: one module
            if module not in names:
                names.append(module)
    return split


def _check_shared_base(names: list[str], splits: list[EngineSplit]) -> None:
    """AdapterError unless every adapter merges the same updates into the base."""
    first = splits[0].merged
    for name, split in zip(names[1:], splits[1:]):
        differ = sorted(set(first) ^ set(split.merged))
        differ = differ or [p for p in sorted(first) if not torch.equal(first[p].to_dense(), split.merged[p].to_dense())]
        if differ:
            why = "; ".join(sorted(set(splits[0].reasons) | set(split.reasons)))
            raise AdapterError(f"adapters {names[0]!r} and {name!r} merge different updates into the base (e.g. "
                               f"{differ[0]}; merged because: {why}), so one base cannot serve both. Export them "
                               f"one at a time to separate --out folders, or combine them into one adapter with "
                               f"`vlm-lora merge --method ...` and export that")


def _alpha(value: float) -> float | int:
    return int(round(value)) if abs(value - round(value)) < 1e-9 else value


def write_engine_adapter(model: nn.Module, split: EngineSplit, rules: EngineRules, out_dir: Path, base_ref: str,
                         origin: str) -> dict:
    """Write the served pairs as a plain PEFT LoRA of one rank (zero-padded to one ``rules`` serves) and
    one scale (in ``lora_alpha``); returns ``{"path", "rank", "lora_alpha", "modules"}``."""
    from vlm_lora.architectures.registry import detect_architecture

    rank = rules.served_rank(max(p.lora_a.shape[0] for p in split.served.values()))
    scale = Counter(p.scaling for p in split.served.values()).most_common(1)[0][0]
    tensors = {}
    for target, pair in sorted(split.served.items()):
        r = pair.lora_a.shape[0]
        lora_a = torch.zeros(rank, pair.lora_a.shape[1])
        lora_b = torch.zeros(pair.lora_b.shape[0], rank)
        lora_a[:r] = pair.lora_a
        lora_b[:, :r] = pair.lora_b if pair.scaling == scale else pair.lora_b * (pair.scaling / scale)
        tensors[f"{PREFIX}{target}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{target}.lora_B.weight"] = lora_b.contiguous()
    targets = sorted(split.served)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_ref, "r": rank,
              "lora_alpha": _alpha(scale * rank), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": targets, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    if rules.leaf_targets:  # leaf names, which every SGLang version reads; exclude_modules keeps PEFT to the LM
        config["target_modules"] = sorted({t.rsplit(".", 1)[-1] for t in targets})
        language = detect_architecture(model).components[LANGUAGE].prefixes
        config["exclude_modules"] = rf"^(?!({'|'.join(map(re.escape, language))})\.).*"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    base_config = weight_config(model)
    meta = {"sliced_layers": {}, "exported_for": rules.name, "exported_from": origin,
            "base_fingerprint": base_fingerprint(model, targets, base_config), "base_config": base_config}
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return {"path": str(out_dir), "rank": rank, "lora_alpha": config["lora_alpha"], "modules": len(targets),
            "target_modules": config["target_modules"]}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).logits.float()


def _adapter_logits(model: nn.Module, adapter_dir: Path, batch: dict, overwritten: list[str]) -> torch.Tensor:
    """Logits of ``model`` with the adapter loaded; the model is left as it was (``overwritten``: parameters
    the adapter's fully-trained tensors replace, restored afterwards)."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in overwritten if name in params}
    load_adapter(model, adapter_dir)
    logits = _logits(model, batch)
    unload_lora(model, merge=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return logits


def serve_command(rules: EngineRules, adapters: dict[str, dict], keep_tower: bool) -> str:
    """The launch command of ``rules``' engine for ``OUT/base`` with ``adapters`` (name -> written info)."""
    base = '"$HERE/base"'
    if rules.name == "vllm":
        command = f"vllm serve {base}"
        if adapters:
            rank = max(a["rank"] for a in adapters.values())
            modules = " ".join(f'{n}="$HERE/{a["relative"]}"' for n, a in adapters.items())
            command += (f" --enable-lora --lora-modules {modules} --max-lora-rank {rank}"
                        f" --max-loras {len(adapters)}" + (f" {rules.tower_flag}" if keep_tower else ""))
        return command
    command = f"python -m sglang.launch_server --model-path {base}"
    if adapters:
        rank = max(a["rank"] for a in adapters.values())
        paths = " ".join(f'{n}="$HERE/{a["relative"]}"' for n, a in adapters.items())
        leaves = " ".join(sorted({t for a in adapters.values() for t in a["target_modules"]}))
        command += (f" --enable-lora --lora-paths {paths} --max-lora-rank {rank} --lora-target-modules {leaves}"
                    f" --max-loras-per-batch {len(adapters)}")
    return command


def _write_serve_script(out_dir: Path, rules: EngineRules, adapters: dict[str, dict], keep_tower: bool) -> Path:
    script = out_dir / "serve.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      f"# written by vlm-lora export --for {rules.name}: serves base/ with the exported adapters\n"
                      "set -euo pipefail\n"
                      'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
                      f'exec {serve_command(rules, adapters, keep_tower)} "$@"\n')
    script.chmod(0o755)
    return script


GENERIC_FOLDERS = ("adapter", "adapter_last")  # what finetune writes; the run folder above names the adapter


def adapter_names(adapter_dirs: list[Path]) -> list[str]:
    """Serving names from the folder names (``runs/quickstart/adapter`` -> ``quickstart``, ``adapter_last``
    -> ``quickstart-last``; characters other than letters, digits, ``_.-`` become ``-``), made unique with
    a ``-2``, ``-3`` ... suffix."""
    names: list[str] = []
    for adapter_dir in adapter_dirs:
        folder = adapter_dir.resolve()
        name = folder.name
        if name in GENERIC_FOLDERS and folder.parent.name:
            name = folder.parent.name + ("-last" if name == "adapter_last" else "")
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", name) or "adapter"
        unique, i = name, 2
        while unique in names:
            unique, i = f"{name}-{i}", i + 1
        names.append(unique)
    return names


def export(base: str, adapter_dirs: list[str | Path], out_dir: str | Path, engine: str, dtype: str = "float32",
           keep_tower: bool = False, force: bool = False) -> dict:
    """Export ``adapter_dirs`` (PEFT adapters of ``base``) for ``engine`` to ``out_dir``; see the module doc.

    Like ``merge``, refuses a base whose weights differ from those an adapter was trained on, unless ``force``.

    Returns a report: per adapter its served rank, modules, what was merged and why, and the largest
    |logit difference| between the adapter model and the served export on a probe input.
    """
    adapter_dirs = [Path(d) for d in adapter_dirs]
    if not adapter_dirs:
        raise AdapterError("export needs at least one --adapter")
    if engine not in ENGINES_AND_TRANSFORMERS:
        raise AdapterError(f"--for must be one of {', '.join(ENGINES_AND_TRANSFORMERS)}, got {engine!r}")
    if engine == "transformers":
        if keep_tower:
            raise AdapterError("--keep-tower-lora applies to --for vllm: a transformers export merges everything")
        if len(adapter_dirs) > 1:
            raise AdapterError(f"{len(adapter_dirs)} adapters cannot all be merged into one transformers model "
                               f"as they are; combine them with `vlm-lora merge --method ... --as model`")
        return {"engine": engine, **merge_adapter(base, adapter_dirs[0], out_dir, dtype, force=force)}
    rules = engine_rules(engine)
    if keep_tower and rules.tower_flag is None:
        raise AdapterError(f"--keep-tower-lora: {rules.title} serves no vision-tower / connector LoRA")
    from vlm_lora.modeling import DTYPES, load_model_and_processor

    model, processor = load_model_and_processor(base, "float32")
    metas = [read_meta(d) for d in adapter_dirs]
    for adapter_dir, meta in zip(adapter_dirs, metas):
        check_base(model, meta, str(adapter_dir))
    refuse_other_weights(model, adapter_dirs, metas, force)
    if keep_tower:
        from vlm_lora.architectures.registry import detect_architecture

        family = detect_architecture(model).name
        if not rules.serves_tower(family):
            raise AdapterError(f"--keep-tower-lora: {rules.title} serves no vision-tower / connector LoRA for "
                               f"{family} (it does for {', '.join(rules.tower_families)})")
    _check_quantization(model, adapter_dirs, metas, allow_mixed=False)
    names = adapter_names(adapter_dirs)
    splits = [split_for_engine(model, d, rules, keep_tower) for d in adapter_dirs]
    _check_shared_base([str(d) for d in adapter_dirs], splits)
    batch = {k: v for k, v in probe_batch(processor).items() if isinstance(v, torch.Tensor)}
    before = [_adapter_logits(model, d, batch, [n for n, p in s.merged.items() if p.full])
              for d, s in zip(adapter_dirs, splits)]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, part in splits[0].merged.items():
            params[name].add_(part.to_dense().to(params[name].dtype))
    out_dir = Path(out_dir)
    written, report = {}, {"engine": engine, "base": str(out_dir / "base"), "adapters": {}}
    for name, adapter_dir, split, logits in zip(names, adapter_dirs, splits, before):
        entry = {"merged": {why: sorted(items) for why, items in split.reasons.items()}}
        if split.served:
            relative = "adapter" if len(adapter_dirs) == 1 else f"adapters/{name}"
            info = write_engine_adapter(model, split, rules, out_dir / relative, str(out_dir / "base"),
                                        str(adapter_dir))
            written[name] = {**info, "relative": relative}
            problems = check_adapter(out_dir / relative, engine, model, info["rank"], keep_tower)
            if problems:
                raise AdapterError(f"the exported adapter {out_dir / relative} breaks {rules.title}'s rules: "
                                   + "; ".join(problems))
            after = _adapter_logits(model, out_dir / relative, batch, [])
            entry.update(info)
        else:
            after = _logits(model, batch)
        entry["max_logit_diff"] = (logits - after).abs().max().item()
        report["adapters"][name] = entry
    model.to(DTYPES[dtype])
    apply_trained_pixels(processor, adapter_dirs[0])
    report["folder"] = write_complete_folder(model, processor, base, out_dir / "base")
    report["serve"] = str(_write_serve_script(out_dir, rules, written, keep_tower))
    report["command"] = serve_command(rules, written, keep_tower)
    return report


def describe(report: dict) -> list[str]:
    """Human-readable lines of an export report: per adapter what was merged into the base and why."""
    if report["engine"] == "transformers":
        return [f"merged {report.get('merged_layers', 0)} LoRA layers into a transformers model "
                f"(max |logit difference| {report.get('max_logit_diff', 0):.3g})"]
    lines = []
    for name, entry in report["adapters"].items():
        for why, items in entry["merged"].items():
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            lines.append(f"{name}: merged into the base: {len(items)} ({shown}): {why}")
        if "rank" in entry:
            lines.append(f"{name}: served as LoRA: {entry['modules']} modules, rank {entry['rank']}, lora_alpha "
                         f"{entry['lora_alpha']} -> {entry['path']}")
        else:
            lines.append(f"{name}: nothing left to serve as LoRA: the base holds the whole adapter")
        lines.append(f"{name}: max |logit difference| adapter vs export: {entry['max_logit_diff']:.3g}")
    lines.append(f"serve with: {report['serve']}")
    return lines
