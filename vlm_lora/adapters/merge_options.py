"""Checks of a merge request before anything is loaded: every problem collected into one error.

Refused: ``--out`` equal to an input (the base folder or an adapter folder, which the merge would
overwrite), ``--t`` outside [0, 1], ``--density`` outside (0, 1], ``--rank`` below 1, a weight count
other than the adapter count, ``slerp`` with other than two adapters, and options the chosen method
ignores (``--density`` with ``linear``, ``--t`` with ``ties``, ...), which would otherwise be dropped
without a word. ``None`` means "not given".
"""

from __future__ import annotations

from pathlib import Path

from vlm_lora.adapters.arithmetic import METHODS, PRUNING_METHODS
from vlm_lora.adapters.fingerprint import AdapterError

# option -> the methods that read it (None: the plain one-adapter merge, no --method)
USED_BY: dict[str, tuple] = {
    "--weights": tuple(m for m in METHODS if m != "slerp"),
    "--density": PRUNING_METHODS,
    "--t": ("slerp",),
    "--seed": ("dare_linear", "dare_ties"),
    "--as": METHODS,
    "--rank": tuple(m for m in METHODS if m != "cat"),  # cat's rank is the sum of the input ranks
}


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _value_problem(option: str, value, output: str | None) -> str | None:
    """What is wrong with the value of an option the method reads; None if nothing."""
    if option == "--t" and not 0 <= value <= 1:
        return f"--t must be in [0, 1] (0 = the first adapter, 1 = the second), got {value}"
    if option == "--density" and not 0 < value <= 1:
        return f"--density must be in (0, 1], got {value}"
    if option == "--rank" and value < 1:
        return f"--rank must be at least 1, got {value}"
    if option == "--rank" and output == "model":
        return "--rank has no effect with --as model (the merged model is exact); drop it or use --as adapter"
    if option == "--as" and value not in ("adapter", "model"):
        return f"--as must be 'adapter' or 'model', got {value!r}"
    return None


def check_merge_request(base: str, adapter_dirs: list, out_dir: str | Path, method: str | None = None,
                        weights: list[float] | None = None, density: float | None = None, t: float | None = None,
                        rank: int | None = None, seed: int | None = None, output: str | None = None,
                        dtype: str | None = None) -> None:
    """``AdapterError`` naming every problem of this merge request at once (see the module doc)."""
    errors = []
    inputs = [("--adapter", d) for d in adapter_dirs]
    if Path(base).exists():  # else a hub id
        inputs.insert(0, ("--base", base))
    for option, path in inputs:
        if _same_path(out_dir, path):
            errors.append(f"--out {out_dir} is the {option} folder; the merge would overwrite its input. "
                          f"Write to another folder")
    if method is not None and method not in METHODS:
        errors.append(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    given = {"--weights": weights, "--density": density, "--t": t, "--seed": seed, "--as": output, "--rank": rank}
    for option, value in given.items():
        if value is None or (option == "--as" and method is None and value == "model"):  # plain merge: a model
            continue
        if method not in USED_BY[option]:
            what = f"--method {method}" if method else "a plain merge (no --method)"
            errors.append(f"{option} has no effect with {what}; it is read only by: {', '.join(USED_BY[option])}")
        elif _value_problem(option, value, output):
            errors.append(_value_problem(option, value, output))
    if dtype not in (None, "float32") and method is not None and output in (None, "adapter"):
        errors.append(f"--dtype {dtype} has no effect with --as adapter (the merged LoRA factors are written in "
                      f"float32); it sets the dtype of --as model")
    if weights is not None and len(weights) != len(adapter_dirs):
        errors.append(f"--weights gives {len(weights)} weight(s) for {len(adapter_dirs)} adapter(s)")
    if method == "slerp" and len(adapter_dirs) != 2:
        errors.append(f"slerp interpolates between exactly two adapters, got {len(adapter_dirs)}")
    if errors:
        raise AdapterError("invalid merge:\n  - " + "\n  - ".join(errors) if len(errors) > 1 else errors[0])
