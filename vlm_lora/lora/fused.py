"""``FusedLinearLora``: per-slice LoRA on a fused projection (``qkv``) ``nn.Linear(in, k * d)``.

The output of the fused linear is ``k`` equal slices laid out as ``spec.slice_order`` (e.g. ``q, k, v``).
Only the slices in ``spec.slices`` get a rank-``r`` pair (loralib's ``MergedLinear`` idea):
``y_i = W_i x + b_i + s * B_i A_i x`` for an adapted slice ``i`` and exactly ``W_j x + b_j`` (bit for bit)
for the others. The A's of one adapter are stacked into one ``nn.Linear(in, n * r)`` (one matmul); the
B's are a :class:`BlockLoraB` (one grouped matmul), so the state-dict keys stay ``lora_A.<name>.weight``
[n * r, in] and ``lora_B.<name>.weight`` [n, d, r].

The helpers below (slice positions, the update, the merge, the PEFT block layout) are shared with
:mod:`vlm_lora.lora.mha`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_lora.lora.base import AdapterSpec, LoraLayer, PeftEntry, adapter_device
from vlm_lora.lora.inject import register_layer_type
from vlm_lora.lora.variants import LoraVariant, get_variant, lora_scaling


class BlockLoraB(nn.Module):
    """The B matrices of ``n`` slices, ``weight`` [n, d, r]: maps [..., n * r] -> [..., n, d]."""

    def __init__(self, n: int, rank: int, d: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d, rank, device=device, dtype=dtype))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        n, _, rank = self.weight.shape
        return torch.einsum("...nr,ndr->...nd", a.unflatten(-1, (n, rank)), self.weight)


def slice_positions(spec: AdapterSpec, allowed: tuple[str, ...] | None = None) -> list[int]:
    """Positions (in ``spec.slice_order``) of the adapted slices, ascending; validates the spec."""
    order = spec.slice_order
    if not order or len(set(order)) != len(order):
        raise ValueError(f"slice_order must name each slice of the fused module once, got {order!r}")
    slices = [s for s in spec.slices if allowed is None or s in allowed]
    unknown = [s for s in slices if s not in order]
    if unknown or len(set(slices)) != len(slices):
        raise ValueError(f"slices {spec.slices!r} must be distinct names from slice_order {order!r}")
    return sorted(order.index(s) for s in slices)


def check_variant(spec: AdapterSpec) -> LoraVariant:
    variant = get_variant(spec.variant)
    if variant.name != "lora":
        raise NotImplementedError(f"fused (per-slice) LoRA supports only plain 'lora', not {spec.variant!r}")
    return variant


def new_sliced_pair(spec: AdapterSpec, n: int, in_features: int, d: int,
                    weight: torch.Tensor) -> tuple[nn.Linear, BlockLoraB, float]:
    """Stacked A ``nn.Linear(in, n * r)``, blocked B [n, d, r], initialised by the variant; and the scaling."""
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    lora_a = nn.Linear(in_features, n * spec.rank, bias=False, device=adapter_device(weight), dtype=dtype)
    lora_b = BlockLoraB(n, spec.rank, d, device=adapter_device(weight), dtype=dtype)
    variant = check_variant(spec)
    variant.init_weights(lora_a, lora_b)  # kaiming-uniform on [n*r, in] has the same bound as on each [r, in]
    return lora_a, lora_b, lora_scaling(spec.rank, spec.alpha, spec.rslora)


def add_slice_update(out: torch.Tensor, update: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """out [..., k * d] plus update [..., n, d] on the slices ``positions``; a new tensor, other
    slices copied bit for bit (nothing is added to them)."""
    n, d = update.shape[-2:]
    index = torch.tensor(positions, device=out.device)
    return out.unflatten(-1, (-1, d)).index_add(-2, index, update.to(out.dtype)).flatten(-2)


def full_width_update(out_rows: torch.Tensor, update: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """[m, k * d] with ``update`` [m, n, d] in the slices ``positions`` and exact zeros elsewhere."""
    return add_slice_update(torch.zeros_like(out_rows), update, positions)


def sliced_delta(lora_a: nn.Linear, lora_b: BlockLoraB, scaling: float) -> torch.Tensor:
    """[n, d, in] fp32 per-slice weight updates ``s * B_i A_i``."""
    n, _, rank = lora_b.weight.shape
    a = lora_a.weight.float().unflatten(0, (n, rank))  # [n, r, in]
    return torch.bmm(lora_b.weight.float(), a) * scaling


@torch.no_grad()
def merge_slice_rows(weight: torch.Tensor, delta: torch.Tensor, positions: list[int], sign: float) -> None:
    """Add ``sign * delta[i]`` ([d, in], fp32) to rows of slice ``positions[i]`` of weight [k * d, in]."""
    d = delta.shape[1]
    for i, pos in enumerate(positions):
        rows = weight[pos * d:(pos + 1) * d]
        rows.copy_((rows.float() + sign * delta[i]).to(weight.dtype))


def export_blocks(lora_a: nn.Linear, lora_b: BlockLoraB, positions: list[int],
                  num_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT pair of rank n * r: lora_A [n * r, in] (the stacked A's), lora_B [k * d, n * r] with
    B_i in the rows of slice ``positions[i]`` and columns ``i * r:(i + 1) * r``, zeros elsewhere."""
    n, d, rank = lora_b.weight.shape
    big_b = lora_b.weight.new_zeros(num_slices * d, n * rank)
    for i, pos in enumerate(positions):
        big_b[pos * d:(pos + 1) * d, i * rank:(i + 1) * rank] = lora_b.weight[i]
    return lora_a.weight.detach().clone(), big_b.detach()


@torch.no_grad()
def import_blocks(lora_a: nn.Linear, lora_b: BlockLoraB, positions: list[int], num_slices: int,
                  peft_a: torch.Tensor, peft_b: torch.Tensor) -> None:
    """Inverse of :func:`export_blocks`; ValueError when the pair is not block-structured."""
    n, d, rank = lora_b.weight.shape
    want_a, want_b = tuple(lora_a.weight.shape), (num_slices * d, n * rank)
    if tuple(peft_a.shape) != want_a or tuple(peft_b.shape) != want_b:
        raise ValueError(f"PEFT pair has lora_A {tuple(peft_a.shape)}, lora_B {tuple(peft_b.shape)}; this adapter "
                         f"needs lora_A {want_a}, lora_B {want_b} (rank {n} slices x {rank})")
    blocks = peft_b.new_zeros(n, d, rank)
    rest = peft_b.clone()
    for i, pos in enumerate(positions):
        blocks[i] = peft_b[pos * d:(pos + 1) * d, i * rank:(i + 1) * rank]
        rest[pos * d:(pos + 1) * d, i * rank:(i + 1) * rank] = 0
    if torch.count_nonzero(rest):
        raise ValueError("PEFT lora_B has non-zero entries outside the per-slice block structure (a column block "
                         "feeding another slice's rows, or rows of an un-adapted slice); it cannot be loaded "
                         "as per-slice LoRA")
    lora_a.weight.copy_(peft_a)
    lora_b.weight.copy_(blocks)


class FusedLinearLora(LoraLayer):
    """LoRA on some slices of a fused ``nn.Linear(in, k * d)`` (timm ``attn.qkv``, BLIP-2 ``self_attn.qkv``).

    Per adapter: ``lora_A[name]`` ``nn.Linear(in, n * r)`` (the n adapted slices' A's stacked in
    slice order), ``lora_B[name]`` :class:`BlockLoraB` [n, d, r].
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, spec: AdapterSpec):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"FusedLinearLora wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.positions: dict[str, list[int]] = {}
        self.add_adapter(adapter_name, spec)

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if "o" in spec.slices:
            raise ValueError("slice 'o' (an output projection) cannot live on a fused qkv linear")
        positions = slice_positions(spec)
        if not positions:
            raise ValueError("FusedLinearLora needs at least one adapted slice in spec.slices")
        k = len(spec.slice_order)
        if self.out_features % k:
            raise ValueError(f"out_features {self.out_features} does not split into {k} equal slices "
                             f"{spec.slice_order!r}")
        if self.specs and len(next(iter(self.specs.values())).slice_order) != k:
            raise ValueError("all adapters on one fused layer must use the same slice_order length")
        d = self.out_features // k
        lora_a, lora_b, scaling = new_sliced_pair(spec, len(positions), self.in_features, d, self.base_layer.weight)
        self.lora_A[name], self.lora_B[name] = lora_a, lora_b
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self.positions[name] = positions
        self.specs[name] = spec
        self.active_adapters.append(name)

    def slice_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """[..., n, d] LoRA update ``s * B_i A_i dropout(x)`` of the adapted slices, x: [..., in]."""
        lora_a = self.lora_A[name]
        a = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))  # one matmul: [..., n * r]
        return self.lora_B[name](a) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., k * d]; un-adapted slices are exactly the base layer's output."""
        out = self.base_layer(x)
        if self.routing is not None:  # a different adapter per batch row
            return self.routed(x, out, lambda name, rows, out_rows: full_width_update(
                out_rows, self.slice_update(name, rows), self.positions[name]))
        for name in self.unmerged_active():
            out = add_slice_update(out, self.slice_update(name, x), self.positions[name])
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """[out, in] fp32 update merging ``name`` adds (zero rows for un-adapted slices)."""
        delta = sliced_delta(self.lora_A[name], self.lora_B[name], self.scaling[name])
        full = delta.new_zeros(self.out_features, self.in_features)
        d = delta.shape[1]
        for i, pos in enumerate(self.positions[name]):
            full[pos * d:(pos + 1) * d] = delta[i]
        return full

    def _merge_adapter(self, name: str, sign: float) -> None:
        delta = sliced_delta(self.lora_A[name], self.lora_B[name], self.scaling[name])
        merge_slice_rows(self.base_layer.weight, delta, self.positions[name], sign)

    def peft_export(self, name: str) -> list[PeftEntry]:
        """One PEFT pair on the layer itself: rank n * r, alpha n * alpha (so alpha / rank is unchanged)."""
        spec, n = self.specs[name], len(self.positions[name])
        lora_a, lora_b = export_blocks(self.lora_A[name], self.lora_B[name], self.positions[name],
                                       len(spec.slice_order))
        return [PeftEntry("", lora_a, lora_b, n * spec.rank, self.scaling[name] * n * spec.rank)]  # alpha/rank = s

    def load_peft(self, name: str, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if any(len(pair) > 2 and pair[2] is not None for pair in entries.values()):
            raise ValueError("a DoRA magnitude vector cannot be loaded into per-slice LoRA")
        entries = {suffix: tuple(pair[:2]) for suffix, pair in entries.items()}  # (lora_A, lora_B)
        if set(entries) != {""}:
            raise ValueError(f"a fused linear takes one PEFT pair with suffix '', got suffixes {sorted(entries)}")
        peft_a, peft_b = entries[""]
        import_blocks(self.lora_A[name], self.lora_B[name], self.positions[name],
                      len(self.specs[name].slice_order), peft_a, peft_b)

    def extra_repr(self) -> str:
        adapters = {n: (s.rank, s.slices) for n, s in self.specs.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={adapters}"


register_layer_type(lambda m, s: isinstance(m, nn.Linear) and bool(s.slices) and "o" not in s.slices,
                    FusedLinearLora)
