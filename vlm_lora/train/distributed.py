"""Several processes: FSDP2 sharding, collective gathers of the trainable state, eval split across ranks.

Under FSDP2 (``train.fsdp: true`` or an accelerate FSDP config) every parameter is a ``DTensor``
shard, and gathering one is a collective: every rank must call the same gathers in the same
order, and only rank 0 writes. The helpers here are no-ops for one process and for DDP, whose
parameters are plain replicated tensors, so the loop runs one code path for all three.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from vlm_lora.train.setup import TrainingError

WRAP_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Block")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------- FSDP2 setup

def wrap_classes(model: nn.Module) -> tuple[str, ...]:
    """Class names of the FSDP units: the registry entry's ``fsdp_wrap_classes`` present in the model, else
    (an entry that declares none, such as the generic fallback) the classes named ``*DecoderLayer`` /
    ``*EncoderLayer`` / ``*Block`` under the components' prefixes."""
    from vlm_lora.architectures.registry import detect_architecture, fsdp_wrap_classes

    declared = fsdp_wrap_classes(model)
    if declared:
        return declared
    prefixes = [p for comp in detect_architecture(model).components.values() for p in comp.prefixes]
    found = {type(module).__name__ for path, module in model.named_modules()
             if any(path.startswith(p + ".") for p in prefixes) and type(module).__name__.endswith(WRAP_SUFFIXES)}
    return tuple(sorted(found))


def shard_model(model: nn.Module, mixed_precision: str, classes: tuple[str, ...] = (),
                reshard_after_forward: bool = True, prepare_unit=None) -> nn.Module:
    """``fully_shard`` every module of ``classes`` (default: :func:`wrap_classes`), then the root.

    Call after the adapters are injected and before the optimizer is built: sharding replaces every
    parameter by a new ``DTensor`` one. With bf16/fp16 the trainable parameters are kept in float32
    (optimizer state and updates in full precision) and gathered in the low precision for compute;
    gradients are reduced in float32. LoRA leaves are never units of their own: the fused paths read
    their weights directly, which only works while the enclosing block is gathered.
    ``prepare_unit(module)``, if given, runs on each unit (then the root) right before it is sharded
    (``bench/scale.py`` materializes and quantizes one unit at a time there).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = classes or wrap_classes(model)
    if not classes:
        raise TrainingError(f"train.fsdp: no block classes to shard found in {type(model).__name__}; name them in "
                            f"an accelerate FSDP config (fsdp_transformer_layer_cls_to_wrap)")
    _, size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = init_device_mesh(device.type, (size,))
    policy = MixedPrecisionPolicy()
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if low is not None:
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.data = param.data.float()
    units = [m for m in model.modules() if type(m).__name__ in classes]
    if not units:
        raise TrainingError(f"train.fsdp: none of the block classes {', '.join(classes)} is in {type(model).__name__}; "
                            f"fix fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    for module in [*reversed(units), model]:  # innermost first: a unit never holds a nested unit's parameters
        if prepare_unit is not None:
            prepare_unit(module)
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


@contextmanager
def gradient_sync(model: nn.Module, accelerator, sync: bool):
    """Reduce gradients across ranks only when ``sync`` (the last micro-batch of a step)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        yield
        model.set_requires_gradient_sync(True)
    elif sync:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params`` (0-d fp32 tensor, no host sync).

    Sharded gradients contribute their local squares to one all-reduce (torch's own ``clip_grad_norm_``
    reduces every DTensor gradient separately: hundreds of small collectives per step with LoRA);
    replicated ones are whole on every rank and are added after the reduce.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [local(g) for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    device = (sharded or replicated or [torch.zeros(())])[0].device

    def squares(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros((), device=device, dtype=torch.float32)
        return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).pow(2).sum()

    total = squares(sharded)
    if sharded and dist.is_initialized():
        dist.all_reduce(total)
    return (total + squares(replicated)).sqrt()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm``; returns the norm."""
    total = grad_norm(params)
    grads = [local(p.grad) for p in params if p.grad is not None]
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)
    return total


# ---------------------------------------------------------------- trainable state

def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter; the parameter itself otherwise."""
    return param.to_local() if isinstance(param, DTensor) else param


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of this rank's part of every trainable parameter (no communication)."""
    return {n: local(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`snapshot_trainable` on the same ranks."""
    params = dict(model.named_parameters())
    for name, value in snapshot.items():
        local(params[name]).copy_(value)


@contextmanager
def full_trainable(model: nn.Module, writeback: bool = False):
    """Inside the block every trainable parameter of ``model`` is a plain full tensor on every rank.

    Collective under FSDP2 (each sharded trainable parameter is all-gathered, in ``named_parameters``
    order, identical on all ranks); frozen parameters stay sharded. Code inside may read the adapter
    (``save_adapter``) or, with ``writeback=True``, load one (``restore_weights``): on exit every rank
    copies its slice of the (possibly replaced) full parameters back into its shards. No forward
    pass may run inside. A no-op without sharded parameters.
    """
    swapped = []  # (module, leaf name, sharded parameter)
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            if not (param.requires_grad and isinstance(param, DTensor)):
                continue
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent) if parent else model
            module._parameters[leaf] = nn.Parameter(param.full_tensor(), requires_grad=True)
            swapped.append((module, leaf, param))
    try:
        yield model
        if writeback:  # collective again: only when the block ended normally
            with torch.no_grad():
                for module, leaf, sharded in swapped:
                    full = module._parameters[leaf].detach().to(sharded.dtype)
                    sharded.to_local().copy_(distribute_tensor(full, sharded.device_mesh, sharded.placements).to_local())
    finally:
        for module, leaf, sharded in swapped:
            module._parameters[leaf] = sharded


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's full state (collective under FSDP2: FQN-keyed, gathered to rank 0 on CPU)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state`; every rank passes the full state read from the checkpoint."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gather_objects(value) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    _, size = world()
    if size == 1:
        return [value]
    out = [None] * size
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------- eval split across ranks

class IndexView:
    """The examples of ``dataset`` at ``indices`` (repeats allowed), with the same interface."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self.examples = [dataset.examples[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def rank_indices(n: int, rank: int, size: int) -> tuple[list[int], int]:
    """(indices of rank ``rank``, how many are real): ``rank::size``, padded by repeating the
    last one so that every rank gets ``ceil(n / size)`` and runs as many batches as the others."""
    real = list(range(rank, n, size))
    per_rank = math.ceil(n / size)
    return real + [real[-1] if real else 0] * (per_rank - len(real)), len(real)


@contextmanager
def gathered_for_eval(model: nn.Module):
    """Keep FSDP2 units gathered between forwards (decoding runs one forward per token), the root's
    own parameters from the start: ``generate`` encodes images outside the root's forward."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False)
    if units:
        from torch.distributed.fsdp import fully_shard

        # before any forward (base eval after sharded loading) the root must set up its units first, or a
        # unit reached outside the root's forward (the vision tower in generate) claims to be a root
        fully_shard.state(model)._lazy_init()
        model.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def evaluate_split(task, model, dataset, desc: str) -> tuple[dict, list[dict]]:
    """``task.evaluate`` with the data set split across ranks: every rank runs its padded share,
    rows are gathered in data-set order on every rank and scored once (``task.score``)."""
    rank, size = world()
    if size == 1:
        return task.evaluate(model, dataset, desc=desc)
    indices, n_real = rank_indices(len(dataset), rank, size)
    with gathered_for_eval(model):
        _, rows = task.evaluate(model, IndexView(dataset, indices), desc=desc)
    pairs = sorted(pair for part in gather_objects(list(zip(indices[:n_real], rows[:n_real]))) for pair in part)
    rows = [row for _, row in pairs]
    return task.score(rows), rows


@torch.no_grad()
def eval_loss_split(task, model, dataset, batch_size: int, collate_to_device) -> float:
    """Mean loss per unit (answer token, image) over ``dataset``, split across ranks and reduced.

    Ranks with one batch fewer run a discarded extra forward so that FSDP's gathers line up."""
    rank, size = world()
    was_training = model.training
    model.eval()
    indices, n_real = rank_indices(len(dataset), rank, size)
    real = indices[:n_real]
    batches = [real[i:i + batch_size] for i in range(0, len(real), batch_size)]
    n_batches = math.ceil(len(indices) / batch_size)
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(n_batches):
        chunk = batches[k] if k < len(batches) else indices[-1:]
        loss, n = task.loss(model, collate_to_device([dataset[i] for i in chunk]))
        if k < len(batches):
            total += torch.tensor([loss.item() * float(n), float(n)], dtype=torch.float64)
    model.train(was_training)
    if size > 1:
        device = next(model.parameters()).device
        total = total.to(device)
        dist.all_reduce(total)
    return float(total[0] / max(float(total[1]), 1.0))
