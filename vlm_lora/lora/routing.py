"""A different adapter per batch row: the token -> adapter map that LoRA layers route by.

``SampleRouting`` is built once from the per-sample adapter names and attached to every LoRA
layer (``layer.routing``); a layer without it (``None``, the default) runs its usual single- or
multi-adapter path untouched. For an input ``x [n, ..., in]`` the layer asks
:meth:`SampleRouting.rows` for ``{adapter: flat token positions}``; the map is computed once per
leading shape and cached, so every layer of one forward (and every decoding step of ``generate``)
reuses it.

How rows of a layer's input map to samples (``n`` = ``x.shape[0]``, ``B`` samples):

* text side: ``n == B`` (one row per sample), or ``n == k B`` (beam search / ``num_return_sequences``
  repeat each sample ``k`` times; flattened ``[B * T, C]`` tokens): sample ``i`` owns rows
  ``i k .. (i + 1) k - 1``;
* image side: ``n`` = total images, sample ``i`` owning ``images_per_sample[i]`` consecutive
  images; or packed vision tokens (Qwen2-VL's ``[sum of patches, C]``), sample ``i`` owning
  ``rows_per_image`` of each of its images; again any whole multiple ``k`` of these.

Which side a layer is on is the layer's ``routing_side`` ("text", "image"; None tries text, then
image). Sides only matter when a sample has other than one image.

Whole multiples are how beam search looks from inside a layer, so the layers cannot tell a batch of
4 rows with 2 names from 2 samples with 2 beams: :meth:`SampleRouting.check_batch` checks the rows
of the call itself (``adapter_per_sample`` runs it before every forward and generate).
"""

from __future__ import annotations

import torch

SIDES = ("text", "image")


class RoutingError(ValueError):
    """A layer input whose rows cannot be mapped to the batch's samples."""


class SampleRouting:
    """names: one adapter name (or None = base model) per batch row.

    images_per_sample: images of each sample (default one each); rows_per_image: packed vision
    rows (patches) of each image, for vision towers that flatten all images into one sequence.
    """

    def __init__(self, names: list[str | None], images_per_sample: list[int] | None = None,
                 rows_per_image: list[int] | None = None):
        if not names:
            raise RoutingError("adapter_per_sample needs one adapter name (or None) per batch row, got none")
        self.names = list(names)
        self.adapters = sorted({n for n in names if n is not None})
        images = list(images_per_sample) if images_per_sample is not None else [1] * len(names)
        if len(images) != len(names) or any(c < 0 for c in images):
            raise RoutingError(f"images_per_sample must give a count >= 0 for each of the {len(names)} samples, "
                               f"got {images}")
        self.segments: dict[str, list[list[int]]] = {"text": [[1] * len(names)], "image": [images]}
        if rows_per_image is not None:
            if len(rows_per_image) != sum(images):
                raise RoutingError(f"rows_per_image must give one count per image ({sum(images)}), "
                                   f"got {len(rows_per_image)}")
            starts = [sum(images[:i]) for i in range(len(images))]
            per_sample = [sum(rows_per_image[s:s + c]) for s, c in zip(starts, images)]
            self.segments["image"].append(per_sample)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def check_batch(self, rows: int | None) -> None:
        """RoutingError unless a call of ``rows`` batch rows gets one name per row, or one name for all."""
        if rows is None or len(self.names) in (1, rows):
            return
        raise RoutingError(f"adapter_per_sample got {len(self.names)} adapter names for a batch of {rows} rows; "
                           f"give one name per row ({rows} names, None for the base model) or a single name "
                           f"for all rows")

    def _sample_of_row(self, n: int, side: str | None) -> torch.Tensor:
        """[n] sample index of each of the n rows of a layer input."""
        sides = [side] if side else list(SIDES)
        tried = []
        for s in sides:
            for counts in self.segments[s]:
                total = sum(counts)
                tried.append(total)
                if total and n % total == 0:
                    repeats = torch.tensor(counts) * (n // total)
                    return torch.arange(len(counts)).repeat_interleave(repeats)
        raise RoutingError(f"cannot map a layer input with {n} rows to {len(self.names)} samples (it should be a "
                           f"multiple of one of {sorted(set(tried))}); pass images_per_sample= or rows_per_image= "
                           f"to adapter_per_sample for multi-image or packed vision inputs")

    def rows(self, shape: torch.Size, device: torch.device, side: str | None = None) -> dict[str, torch.Tensor]:
        """``{adapter: (positions, slice or None)}`` in the flattened leading dims of an input of leading
        ``shape`` (``x.shape[:-1]``); the slice when the positions are one contiguous block. The base
        rows (None) are in no entry. Cached per shape."""
        key = (tuple(shape), str(device), side)
        routes = self._cache.get(key)
        if routes is None:
            sample = self._sample_of_row(shape[0] if len(shape) else 1, side)
            per_row = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
            token_sample = sample.repeat_interleave(per_row)  # [prod(shape)]
            adapter_of_sample = torch.tensor([self.adapters.index(n) if n is not None else -1 for n in self.names])
            token_adapter = adapter_of_sample[token_sample]
            routes = {}
            for i, name in enumerate(self.adapters):
                positions = torch.nonzero(token_adapter == i).flatten()
                if positions.numel():
                    first, last = int(positions[0]), int(positions[-1])
                    contiguous = slice(first, last + 1) if last - first + 1 == positions.numel() else None
                    routes[name] = (positions.to(device), contiguous)
            self._cache[key] = routes
        return routes


def routed_update(x: torch.Tensor, out: torch.Tensor, routes: dict[str, torch.Tensor], has_adapter, update) -> torch.Tensor:
    """``out`` plus, for each routed adapter present on the layer, its update on its rows only.

    x [..., in], out [..., out]; ``update(name, x_rows [m, in], out_rows [m, out])`` returns the
    [m, out] (or [m, ...]) addition for those rows; the other rows stay exactly ``out``.
    """
    flat_x = x.reshape(-1, x.shape[-1])
    flat_out = out.reshape(flat_x.shape[0], *out.shape[x.dim() - 1:])
    in_place = not torch.is_grad_enabled()  # contiguous rows (one adapter per block of samples): views, no copies
    for name, (positions, contiguous) in routes.items():
        if not has_adapter(name):
            continue
        if in_place and contiguous is not None:
            rows = flat_out[contiguous]
            rows += update(name, flat_x[contiguous], rows).to(flat_out.dtype)
        else:
            delta = update(name, flat_x[positions], flat_out[positions])
            flat_out = flat_out.index_add(0, positions, delta.to(flat_out.dtype))
    return flat_out.view(out.shape)
