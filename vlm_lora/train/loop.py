"""The fine-tuning loop behind ``vlm-lora finetune``.

load base -> plan -> (score base) -> apply adapters -> train -> keep the best adapter -> score it.
One process or many through accelerate or torchrun (``accelerate launch -m vlm_lora finetune RECIPE``),
DDP or FSDP2 (``train.fsdp``, see ``train.distributed``); every rank takes part in eval and in
gathering adapters and checkpoints, only the main process writes. Everything lands in
``output_dir``: ``adapter/`` (best by ``train.metric_for_best``, PEFT format), ``adapter_last/``, ``checkpoint-<step>/``,
``metrics.jsonl``, ``loss.png``, ``eval.json``, predictions, ``plan.txt``, ``recipe.resolved.yaml``.

Data order is a pure function of (seed, epoch): micro-batch ``k`` of the run is the same in
every run, so a resumed run continues exactly where the killed one left off. ``data.loader``
loads it in DataLoader workers (``data.num_workers``) with the same batches as in-process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from vlm_lora.adapters.peft_format import save_adapter
from vlm_lora.train.checkpoint import (load_trainer_state, rank_rng_state, restore_weights, rng_state,
                                       save_checkpoint, set_rng_state)
from vlm_lora.train import distributed, memory, sharded_load
from vlm_lora.train.best import best_summary, eval_failure, track_best
from vlm_lora.train.guard import DivergenceGuard
from vlm_lora.eval.captioning import write_predictions
from vlm_lora.planner import Plan, PlanError, plan as make_plan
from vlm_lora.train.optim import lr_lambda, make_optimizer, param_groups
from vlm_lora.eval.plotting import plot_loss
from vlm_lora.lora.adalora import final_ranks_note
from vlm_lora.adapters.loftq_report import run_loftq
from vlm_lora.lora.hooks import attach_step_hooks
from vlm_lora.quantize import quantize_linears
from vlm_lora.recipe import Recipe
from vlm_lora.train.output_dir import check_writable, prepare_output_dir, resume_point
from vlm_lora.train.profiling import StepProfiler
from vlm_lora.train.precision import LossScaling, divergence_error, upcast_trainable, uses_fp16_amp
from vlm_lora.train.run_log import MetricsWriter, fmt, summary
from vlm_lora.train.setup import RunExistsError, TrainingError, build_task_and_data, load_for_recipe, make_train_loader
from vlm_lora.train.speed import apply_speed_options, packing_rope_positions, packing_row_tokens
from vlm_lora.data.labelled import WithLabelledPositions
from vlm_lora.data.packing import PackingCollator

log = logging.getLogger("vlm_lora")

__all__ = ["RunExistsError", "TrainingError", "finetune", "param_groups"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict:
    """Run a recipe end to end; returns the ``eval.json`` content (main process)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    cfg, started = recipe.train, time.time()
    out = Path(recipe.output_dir)
    AcceleratorState._reset_state(reset_partial_state=False)  # a second finetune() may use another precision
    # LoRA gradients are few and small: no unused-parameter search, no buffer broadcast per forward
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False)
    fp16 = uses_fp16_amp(recipe.model.dtype, cfg.mixed_precision)  # our autocast + GradScaler, not accelerate's
    accelerator = Accelerator(mixed_precision="no" if fp16 else _mixed_precision(cfg.mixed_precision),
                              kwargs_handlers=[ddp])
    fsdp = cfg.fsdp or accelerator.distributed_type == DistributedType.FSDP
    if fsdp and accelerator.num_processes == 1:
        raise TrainingError("train.fsdp shards the model over several processes, but this run has one; launch with "
                            "`accelerate launch --num_processes N -m vlm_lora finetune ...` (or torchrun), "
                            "or leave train.fsdp false")
    if fsdp and fp16:
        raise TrainingError("train.fsdp: fp16 needs a gradient scaler that FSDP runs do not have; "
                            "set train.mixed_precision to bf16 or no")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # e.g. torchrun on CPU without ACCELERATE_USE_CPU=1
        raise TrainingError(f"{launched} processes were launched but accelerate runs {accelerator.num_processes}; "
                            f"each would train alone and write the same files. On CPU set ACCELERATE_USE_CPU=1")
    main = accelerator.is_main_process
    checkpoint = resume_point(out, recipe, resume, overwrite)  # every rank decides before the main one writes
    check_writable(out, accelerator.process_index)  # before any work
    accelerator.wait_for_everyone()
    if main:
        prepare_output_dir(out, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
                           clear=overwrite and checkpoint is None)  # --resume wins over --overwrite
    accelerator.wait_for_everyone()
    seed_everything(cfg.seed)

    why_whole = sharded_load.refusal(recipe) if fsdp else "no FSDP"
    if why_whole is None:  # meta model, adapters in, sharded, each rank reads its shards: nothing else to apply
        model, processor, plan = sharded_load.load_sharded(recipe, accelerator.mixed_precision,
                                                           _plugin_wrap_classes(accelerator), accelerator.device)
    else:
        if fsdp:
            log.info("train.fsdp: every rank loads the whole base before sharding (%s)", why_whole)
        model, processor = load_for_recipe(recipe, accelerator.device)
        plan = make_plan(model, recipe.strategy, recipe.components)
    _check_quantization(recipe, plan)
    _check_loftq(recipe, plan)
    task, train_set, eval_set = build_task_and_data(recipe, model, processor)
    if accelerator.num_processes > 1 and hasattr(task.collate, "vision_dummy"):
        task.collate.vision_dummy = True  # a text-only batch still runs the vision tower on its rank
    if main:
        (out / "plan.txt").write_text(str(plan) + "\n")
        log.info("\n%s", plan)

    results: dict = {}
    if eval_set is not None and cfg.eval_base and checkpoint is None:  # split across ranks
        results["base"], rows = distributed.evaluate_split(task, model, eval_set, desc="scoring base")
        if main:
            write_predictions(rows, out / "predictions_base.jsonl")
            log.info("base model on %s: %s", recipe.data.eval, fmt(results["base"]))
    elif checkpoint is not None and (out / "eval_base.json").is_file():
        results["base"] = json.loads((out / "eval_base.json").read_text())
    if main and "base" in results:
        (out / "eval_base.json").write_text(json.dumps(results["base"], indent=2) + "\n")

    if why_whole is not None:  # (sharded loading did this before sharding; its base eval ran with zero-B adapters)
        _quantize_if_asked(recipe, model, plan, fsdp)
        plan.apply(model)
        apply_speed_options(model, cfg, recipe.data.packing)
    scaling = LossScaling(fp16, accelerator.device)
    if fp16:
        log.info("fp16 mixed precision: %d trainable tensors kept in fp32, fp16 autocast, loss scaling",
                 upcast_trainable(model))
    if recipe.data.packing:
        task.collate = PackingCollator(task.collate, packing_row_tokens(model), packing_rope_positions(model))
    if fsdp and why_whole is not None:  # after the adapters (and checkpointing, compile), before the optimizer
        model = distributed.shard_model(model, accelerator.mixed_precision, _plugin_wrap_classes(accelerator))
    groups = param_groups(model, plan, cfg.learning_rate, cfg.weight_decay, cfg.loraplus_lr_ratio)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.learning_rate)
    world = accelerator.num_processes
    per_step = world * cfg.grad_accum  # micro-batches one optimizer step consumes, over all processes
    collate = task.collate
    if getattr(task, "uses_labelled_head", None) and task.uses_labelled_head(model):
        collate = WithLabelledPositions(collate)  # found on the CPU: the step then never waits for the GPU
    loader = make_train_loader(recipe, train_set, collate, accelerator)
    total_steps = loader.total_steps(cfg.epochs, per_step, cfg.max_steps)
    if cfg.profile_steps and sum(cfg.profile_steps) - 1 > total_steps:
        raise TrainingError(f"train.profile_steps: {list(cfg.profile_steps)} records up to step "
                            f"{sum(cfg.profile_steps) - 1}, but this run has {total_steps} steps; record earlier steps")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps))
    if not fsdp:  # sharded models are not handed to accelerate, which would wrap them in DDP
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = model if fsdp else accelerator.unwrap_model(model)
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]  # the parameters prepare left in place

    step, best, saved_data = 0, {"value": None, "step": None, "state": None}, None
    metric = cfg.metric_for_best or task.default_metric
    if checkpoint is not None:
        step, best, saved_data = _restore(checkpoint, unwrapped, optimizer, scheduler, scaling, metric,
                                          accelerator.process_index)
        log.info("resuming from %s (step %d of %d)", checkpoint, step, total_steps)
    loader.start(step * per_step, saved_data)
    try:  # DyLoRA's rank sample, AdaLoRA's budget
        attach_step_hooks(unwrapped, getattr(optimizer, "optimizer", optimizer), step, total_steps)
    except ValueError as error:
        raise PlanError(str(error)) from None
    writer = MetricsWriter(out, cfg.tensorboard, resume_step=step if checkpoint is not None else None) if main else None

    def save_gathered(folder: Path) -> None:  # main process, inside distributed.full_trainable
        save_adapter(unwrapped, folder, recipe.model.path, plan.full_prefixes(), never_saved=plan.frozen_paths,
                     extra_meta=_adapter_meta(recipe))

    def write_adapter(folder: Path) -> None:  # every rank: gathers under FSDP, the main process writes
        with distributed.full_trainable(unwrapped):
            if main:
                save_gathered(folder)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=not main)
    window = {"loss": 0.0, "samples": 0, "start": time.time(), "step_seconds": []}
    last_saved = False
    peaks: list[float] = []
    model.train()
    guard = DivergenceGuard(accelerator.device)
    profiler = StepProfiler(cfg.profile_steps, out / "profile", accelerator.device, enabled=main)

    def stop_if_diverged() -> None:  # one host sync; every rank calls it at the same steps
        found = guard.check()
        if found is not None:
            raise TrainingError(divergence_error(out, found[0], found[1], recipe))

    while step < total_steps:
        profiler.before(step + 1)
        step_started = time.perf_counter()
        batches, n_samples = loader.next(cfg.grad_accum, accelerator.device)
        # units (answer tokens, samples) per micro-batch and over every process: device tensors, no host sync
        units = [torch.as_tensor(task.count_units(b), device=accelerator.device).double() for b in batches]
        total_units = accelerator.reduce(torch.stack(units).sum(), "sum").clamp(min=1.0)
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, (batch, n) in enumerate(zip(batches, units)):
            sync = i == len(batches) - 1
            with distributed.gradient_sync(model, accelerator, sync):
                with scaling.autocast():
                    loss, _ = task.loss(model, batch)
                # sum over micro-batches of (mean loss x units) / all units; DDP averages over processes
                accelerator.backward(scaling.scale(loss * (n * world / total_units).to(loss.dtype)))
            step_loss += loss.detach().double() * n
        step_loss = accelerator.reduce(step_loss, "sum") / total_units
        scaling.unscale(optimizer)
        if cfg.max_grad_norm and fsdp:
            norm = distributed.clip_grad_norm(trainable, cfg.max_grad_norm)  # one all-reduce for every shard
        elif cfg.max_grad_norm:
            norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        else:
            norm = distributed.grad_norm(trainable)
        # fp16: the scaler itself skips steps with inf/NaN gradients (and lowers the scale); only the loss counts
        guard.record(step, step_loss, norm if not scaling.enabled else None)
        scaling.step(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        window["loss"] = window["loss"] + step_loss  # a device tensor, read at the log step
        window["samples"] += n_samples * world
        window["step_seconds"].append(time.perf_counter() - step_started)  # host time; asynchronous, sums right
        profiler.after(step)  # (writing the record is not the step's time)
        log_now = step % cfg.log_steps == 0 or step == total_steps
        if log_now:
            stop_if_diverged()
            peaks = memory.rank_peaks(accelerator.device)  # collective: every rank
        if main and log_now:
            n_steps = cfg.log_steps if step % cfg.log_steps == 0 else step % cfg.log_steps
            row = {"step": step, "epoch": loader.epoch(), "loss": float(window["loss"]) / n_steps,
                   "lr": scheduler.get_last_lr()[0], "samples_per_s": window["samples"] / (time.time() - window["start"]),
                   "data_wait": loader.waited() / (time.time() - window["start"]), "peak_mem_mib": peaks,
                   "step_seconds": [round(t, 4) for t in window["step_seconds"]]}
            writer.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.1f}")
        if log_now:
            window = {"loss": 0.0, "samples": 0, "start": time.time(), "step_seconds": []}
        if step == total_steps:  # saved before the last eval, which may fail (a kernel without CPU support)
            write_adapter(out / "adapter_last")
            last_saved = True
        if eval_set is not None and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == total_steps):
            stop_if_diverged()

            def rescue() -> None:  # the eval failed mid-run: keep what was trained
                write_adapter(out / "adapter_last")
                if best["step"] is None:
                    write_adapter(out / "adapter")
            with eval_failure(f"eval at step {step}", out / "adapter_last", rescue), scaling.autocast():
                scores = _periodic_eval(task, unwrapped, eval_set, cfg, step, writer, out)  # every rank
            track_best(best, scores, metric, step, unwrapped, out / "adapter", write_adapter)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            stop_if_diverged()
            position = {"step": step, "micro_batches": loader.position, "best": best_summary(best),
                        "data": loader.state()}
            state = {"optimizer": distributed.optimizer_state(unwrapped, optimizer), "scheduler": scheduler.state_dict(),
                     "rng": distributed.gather_objects(rng_state()), "position": position, "scaler": scaling.state_dict()}
            with distributed.full_trainable(unwrapped):
                if main:
                    save_checkpoint(out, step, save_gathered, state, cfg.save_total_limit)
            accelerator.wait_for_everyone()
    bar.close()
    loader.close()
    if loader.skipped:
        log.warning("skipped %d bad sample(s) while training: %s", len(loader.skipped),
                    "; ".join(map(str, loader.skipped[:20])) + (" ..." if len(loader.skipped) > 20 else ""))

    if not last_saved:  # the loop did not run (resumed at the end)
        write_adapter(out / "adapter_last")
    if best["step"] is None:  # no eval during training: the last adapter is the one we keep
        write_adapter(out / "adapter")
    elif best["state"] is not None:
        distributed.restore_trainable(unwrapped, best["state"])
    else:  # the best was found before a resume and is only on disk
        with distributed.full_trainable(unwrapped, writeback=True):
            restore_weights(unwrapped, out / "adapter")
    train_time = time.time() - started
    if eval_set is not None:
        with eval_failure("the final eval", out / "adapter", writer.close if writer else lambda: None), \
                scaling.autocast():
            results["adapted"], rows = distributed.evaluate_split(task, unwrapped, eval_set, desc="scoring adapted")
        if best["step"] is not None:
            results["adapted"]["best_step"] = best["step"]
    if main:
        note = final_ranks_note(unwrapped)  # AdaLoRA: the ranks the budget left, appended to the plan
        if note:
            log.info("%s", note)
            with open(out / "plan.txt", "a") as plan_file:
                plan_file.write(note)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        if eval_set is not None:
            write_predictions(rows, out / "predictions_adapted.jsonl")
            (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        writer.close()
        if peaks:
            memory.log_against_estimate(peaks, memory.estimate_memory(unwrapped, plan, recipe, world),
                                        accelerator.device)
        summary(out, results, train_time, time.time() - started, step, metric, best, max(peaks, default=None))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _check_quantization(recipe: Recipe, plan: Plan) -> None:
    """PiSSA/OLoRA rewrite the base weight, which a 4-bit base cannot hold: refuse before any work."""
    quant = recipe.model.quantization
    for comp in plan.components:
        if (quant.bits == 4 and comp.component in quant.components and comp.policy.mode == "lora"
                and comp.policy.init in ("pissa", "olora")):
            raise PlanError(f"components.{comp.component}.init: {comp.policy.init} needs a full-precision base, but "
                            f"model.quantization puts {comp.component} in 4-bit; use init kaiming or gaussian, or "
                            f"leave {comp.component} out of model.quantization.components")


def _check_loftq(recipe: Recipe, plan: Plan) -> None:
    quant = recipe.model.quantization
    for comp in plan.components:
        if comp.policy.mode == "lora" and comp.policy.init == "loftq" and not (
                quant.bits == 4 and comp.component in quant.components):
            raise PlanError(f"components.{comp.component}.init: loftq initialises an adapter for a 4-bit base; set "
                            f"model.quantization.bits: 4 with {comp.component} in model.quantization.components")


def _quantize_if_asked(recipe: Recipe, model, plan: Plan, sharded: bool) -> None:
    quant = recipe.model.quantization
    if quant.bits != 4:
        return
    prefixes = plan.prefixes_of([c for c in quant.components if plan.mode_of(c) != "full"])
    run_loftq(model, plan, quant.type, quant.double_quant)  # init: loftq, before the base goes 4-bit
    storage = quant.compute_dtype if sharded else None  # FSDP shards 4-bit weights packed in the compute dtype
    n = len(quantize_linears(model, prefixes, quant.type, quant.double_quant, quant.compute_dtype, storage))
    log.info("QLoRA: %d linears of %s in 4-bit %s (compute %s)", n, ", ".join(quant.components), quant.type,
             quant.compute_dtype)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _plugin_wrap_classes(accelerator) -> tuple[str, ...]:
    """Block classes named in an accelerate FSDP config (``fsdp_transformer_layer_cls_to_wrap``), if any."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or ()
    return tuple(names.split(",") if isinstance(names, str) else names)


def _periodic_eval(task, model, eval_set, cfg, step: int, writer, out: Path) -> dict:
    """Eval loss and scores, split across ranks; every rank gets the same numbers, the main one logs."""
    subset = eval_set if not cfg.eval_samples else eval_set.subset(cfg.eval_samples)
    device = next(model.parameters()).device
    eval_loss = distributed.eval_loss_split(task, model, subset, cfg.eval_batch_size,
                                            lambda items: _to_device(task.collate(items), device))
    scores, _ = distributed.evaluate_split(task, model, subset, desc=f"eval @ {step}")
    if writer is not None:
        writer.write({"step": step, "eval_loss": eval_loss, **{f"eval_{k}": v for k, v in scores.items()}})
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return {"eval_loss": eval_loss, **scores}


def _restore(checkpoint: Path, model, optimizer, scheduler, scaling: LossScaling, metric: str,
             rank: int) -> tuple[int, dict, dict | None]:
    """Load adapter weights, optimizer, scheduler and this rank's RNG state (every rank); returns (step, best,
    the loader's saved state)."""
    state = load_trainer_state(checkpoint)
    with distributed.full_trainable(model, writeback=True):
        restore_weights(model, checkpoint)
    distributed.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaling.load_state_dict(state.get("scaler"))
    set_rng_state(rank_rng_state(state, rank))
    saved = state["position"].get("best") or {}
    # the best adapter so far is on disk in out/adapter; it is reloaded at the end if nothing beats it
    return (state["step"], {"value": saved.get("value"), "step": saved.get("step"), "state": None},
            state["position"].get("data"))


def _adapter_meta(recipe: Recipe) -> dict:
    """What a later merge needs to know: the 4-bit layout the adapter was trained on, the pixel budget."""
    from vlm_lora.train.pixels import pixel_settings, video_settings

    quant, pixels = recipe.model.quantization, {**pixel_settings(recipe.data), **video_settings(recipe.data)}
    return {"quantization": quant.model_dump() if quant.bits == 4 else None, **({"processor": pixels} if pixels else {})}


