"""Adapter arithmetic: every method against a small reference written here, cat/svd against PEFT's
add_weighted_adapter, identity merges (rsLoRA, DoRA, fully-trained connector), exact and truncated
re-factoring, and the refusals."""

import copy
import json
import math

import pytest
import torch
from PIL import Image

import vlm_lora
from conftest import ASSET_MODEL, randomize_adapters
from vlm_lora.adapters.arithmetic import METHODS, merge_deltas, qr_svd_factors, svd_factors
from vlm_lora.adapters.merge import adapter_deltas, merge_adapters, merge_parts
from vlm_lora.adapters.peft_format import AdapterError
from vlm_lora.cli import main
from vlm_lora.modeling import load_model_and_processor

BASE = str(ASSET_MODEL)


# ---------------------------------------------------------------- references (entry by entry, plain Python)

def ref_trim(d, density):
    flat = d.flatten().tolist()
    keep = int(density * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:keep]
    out = [0.0] * len(flat)
    for i in order:
        out[i] = flat[i]
    return torch.tensor(out).view(d.shape)


def ref_ties(deltas, weights):
    """mergekit: weighted deltas, sign of their sum (>= 0 is +), agreeing entries averaged by weight."""
    flat = [d.flatten().tolist() for d in deltas]
    out = []
    for j in range(len(flat[0])):
        weighted = [w * f[j] for w, f in zip(weights, flat)]
        elected = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [k for k, v in enumerate(weighted) if v != 0 and math.copysign(1.0, v) == elected]
        divisor = sum(weights[k] for k in agree) or 1.0
        out.append(sum(weighted[k] for k in agree) / divisor)
    return torch.tensor(out).view(deltas[0].shape)


def ref_slerp(t, v0, v1):
    a, b = v0.flatten().double(), v1.flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a + t * b).float().view(v0.shape)
    omega = math.acos(cos)
    return ((math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)).float().view(v0.shape)


def _deltas(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_methods_equal_reference_implementations():
    deltas, weights = _deltas(), [0.7, 0.5, -0.3]
    torch.testing.assert_close(merge_deltas(deltas, weights, "linear"), sum(w * d for w, d in zip(weights, deltas)))
    pruned = [ref_trim(d, 0.4) for d in deltas]
    torch.testing.assert_close(merge_deltas(deltas, weights, "magnitude_prune", 0.4),
                               sum(w * d for w, d in zip(weights, pruned)))
    torch.testing.assert_close(merge_deltas(deltas, weights, "ties", 0.4), ref_ties(pruned, weights))
    # DARE: one Bernoulli(density) draw per delta, in order, from a generator seeded with 5
    g = torch.Generator().manual_seed(5)
    masks = [torch.bernoulli(torch.full(d.shape, 0.6), generator=g) for d in deltas]
    dared = [d * m / 0.6 for d, m in zip(deltas, masks)]
    assert 0 < sum(int(m.sum()) for m in masks) < 90
    torch.testing.assert_close(merge_deltas(deltas, weights, "dare_linear", 0.6, generator=torch.Generator().manual_seed(5)),
                               sum(w * d for w, d in zip(weights, dared)))
    torch.testing.assert_close(merge_deltas(deltas, weights, "dare_ties", 0.6, generator=torch.Generator().manual_seed(5)),
                               ref_ties(dared, weights))
    torch.testing.assert_close(merge_deltas(deltas[:2], [1, 1], "slerp", t=0.3), ref_slerp(0.3, *deltas[:2]))
    colinear = [deltas[0], 2 * deltas[0]]  # |cos| = 1: lerp
    torch.testing.assert_close(merge_deltas(colinear, [1, 1], "slerp", t=0.25), 1.25 * deltas[0])
    for t, end in ((0.0, deltas[0]), (1.0, deltas[1])):
        torch.testing.assert_close(merge_deltas(deltas[:2], [1, 1], "slerp", t=t), end, atol=1e-5, rtol=0)


def test_svd_refactoring_is_exact_at_full_rank_and_drops_the_tail():
    g = torch.Generator().manual_seed(1)
    factors = [(torch.randn(20, r, generator=g), torch.randn(r, 16, generator=g)) for r in (3, 2)]
    weights = [0.8, -0.4]
    dense = sum(w * b @ a for w, (b, a) in zip(weights, factors))
    sigma = torch.linalg.svdvals(dense)
    for k in (5, 3, 1):
        b, a, error = qr_svd_factors(factors, weights, k)
        b2, a2, error2 = svd_factors(dense, k)
        assert b.shape == (20, k) and a.shape == (k, 16)
        torch.testing.assert_close(b @ a, b2 @ a2, atol=1e-4, rtol=0)  # QR + small SVD = the dense SVD
        dropped = sigma[k:].pow(2).sum().sqrt()
        torch.testing.assert_close((dense - b @ a).norm(), dropped, atol=1e-4, rtol=1e-4)
        assert error == pytest.approx(float(dropped / sigma.pow(2).sum().sqrt()), abs=1e-5) and error2 == pytest.approx(error, abs=1e-5)
    assert qr_svd_factors(factors, weights, 5)[2] < 1e-6


# ---------------------------------------------------------------- on the tiny LLaVA, through files

@pytest.fixture(scope="module")
def base():
    """(model, processor, probe batch) of the embedded tiny LLaVA, loaded once."""
    model, processor = load_model_and_processor(BASE)
    image = Image.new("RGB", (48, 48), (200, 120, 160))
    batch = processor(images=[image], text=["USER: <image>\nDescribe the image. ASSISTANT: a pink"],
                      return_tensors="pt")
    return model, processor, batch


@torch.no_grad()
def _logits(model, batch):
    return model(**batch).logits


def _save(base_model, folder, seed, **components):
    model = copy.deepcopy(base_model)
    plan = vlm_lora.plan(model, "language_only", **components)
    plan.apply(model)
    randomize_adapters(model, seed=seed)
    vlm_lora.save_adapter(model, folder, BASE, plan.full_prefixes())
    return model.eval()


def _with_adapter(base_model, folder):
    model = copy.deepcopy(base_model)
    vlm_lora.load_adapter(model, folder)
    return model


@pytest.fixture(scope="module")
def frozen_connector_adapters(base, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("adapters")
    _save(base[0], tmp_path / "a", 1, language_decoder={"rank": 4}, connector={"mode": "frozen"})
    _save(base[0], tmp_path / "b", 2, language_decoder={"rank": 2, "targets": ["q", "v", "up"]},
          connector={"mode": "frozen"})
    return tmp_path


@pytest.mark.parametrize("method, peft_kwargs", [("cat", {}), ("svd", {"svd_rank": 3})])
def test_cat_and_svd_equal_peft_add_weighted_adapter(base, frozen_connector_adapters, tmp_path, method, peft_kwargs):
    peft = pytest.importorskip("peft")
    (base_model, _, batch), folder, weights = base, frozen_connector_adapters, [0.7, -0.4]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), folder / "a", adapter_name="a")
    peft_model.load_adapter(folder / "b", adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=method, **peft_kwargs)
    peft_model.set_adapter("m")
    theirs = _logits(peft_model.eval(), batch)
    report = merge_adapters(BASE, [folder / "a", folder / "b"], tmp_path / "m", method, weights,
                            rank=peft_kwargs.get("svd_rank"))
    ours = _logits(_with_adapter(base_model, tmp_path / "m"), batch)
    assert (ours - _logits(base_model, batch)).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-3
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    q_path = next(t for t in config["target_modules"] if t.endswith("q_proj"))
    assert config["rank_pattern"].get(q_path, config["r"]) == (6 if method == "cat" else 3)
    assert (report["max_relative_truncation_error"] > 1e-3) == (method == "svd")


def test_linear_equals_the_sum_of_deltas(base, frozen_connector_adapters, tmp_path):
    (base_model, _, batch), folder, weights = base, frozen_connector_adapters, [0.5, 1.5]
    model = copy.deepcopy(base_model)
    for name in ("a", "b"):
        vlm_lora.load_adapter(model, folder / name, adapter_name=name)
    for _, layer in vlm_lora.lora.iter_lora_layers(model):  # weight the adapters: s_i -> w_i s_i
        for name, w in zip(("a", "b"), weights):
            if name in layer.scaling:
                layer.scaling[name] *= w
    vlm_lora.set_adapter(model, ["a", "b"])
    expected = _logits(model, batch)
    merge_adapters(BASE, [folder / "a", folder / "b"], tmp_path / "model", "linear", weights, output="model")
    merged = _logits(load_model_and_processor(str(tmp_path / "model"))[0], batch)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    merge_adapters(BASE, [folder / "a", folder / "b"], tmp_path / "adapter", "linear", weights, rank=6)
    torch.testing.assert_close(_logits(_with_adapter(base_model, tmp_path / "adapter"), batch), expected,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("components", [
    {"language_decoder": {"rank": 4, "rslora": True}},  # with the fully-trained connector
    {"language_decoder": {"rank": 4, "variant": "dora"}, "connector": {"mode": "frozen"}},
])
def test_merging_one_adapter_with_weight_one_reproduces_it(base, tmp_path, components):
    """Every method: the merged model gives the adapter model's logits; as an adapter, every merged
    LoRA pair has the input's product (DoRA's delta is not low-rank: re-factoring it is not exact)."""
    base_model, _, batch = base
    expected = _logits(_save(base_model, tmp_path / "one", 3, **components), batch)
    parts = adapter_deltas(base_model, tmp_path / "one")
    params = dict(base_model.named_parameters())
    dora = components["language_decoder"].get("variant") == "dora"
    assert any(p.full for p in parts.values()) != dora
    for method in METHODS:
        inputs = [parts] * (2 if method == "slerp" else 1)  # slerp: between the adapter and itself
        merged, _ = merge_parts(inputs, [1.0] * len(inputs), method, t=0.3, as_adapter=False)
        model = copy.deepcopy(base_model)
        with torch.no_grad():
            for name, part in merged.items():
                dict(model.named_parameters())[name].add_(part.to_dense())
        torch.testing.assert_close(_logits(model, batch), expected, atol=1e-4, rtol=0, msg=method)
        if not dora:
            refactored, errors = merge_parts(inputs, [1.0] * len(inputs), method, t=0.3,
                                             shapes={n: params[n].shape for n in parts})
            assert max(errors.values(), default=0) < 1e-5
            for name, part in refactored.items():
                assert (part.factors is None) == parts[name].full
                torch.testing.assert_close(part.to_dense(), parts[name].to_dense(), atol=1e-5, rtol=0, msg=method)
    merge_adapters(BASE, [tmp_path / "one"], tmp_path / "merged", "ties", output="model")  # through the files once
    torch.testing.assert_close(_logits(load_model_and_processor(str(tmp_path / "merged"))[0], batch), expected,
                               atol=1e-4, rtol=0)


def test_refusals(frozen_connector_adapters, tmp_path, capsys):
    folder = frozen_connector_adapters
    args = ["merge", "--base", BASE, "--out", str(tmp_path / "x")]
    assert main(args + ["--adapter", str(folder / "a"), "--adapter", str(folder / "b")]) == 2
    assert "need --method" in capsys.readouterr().err
    assert main(args + ["--adapter", str(folder / "a")] * 3 + ["--method", "slerp"]) == 2
    assert "exactly two adapters" in capsys.readouterr().err
    meta_file = folder / "b" / "vlm_lora.json"
    original = meta_file.read_text()
    try:
        meta = json.loads(original)
        meta["quantization"] = {"type": "nf4", "double_quant": True, "components": ["language_decoder"]}
        meta_file.write_text(json.dumps(meta))
        assert main(args + ["--adapter", str(folder / "a"), "--adapter", str(folder / "b"), "--method", "ties"]) == 2
        assert "--allow-mixed-quantization" in capsys.readouterr().err
        meta["base_fingerprint"]["config_sha256"] = "0" * 64
        meta_file.write_text(json.dumps(meta))
        assert main(args + ["--adapter", str(folder / "a"), "--adapter", str(folder / "b"), "--method", "cat"]) == 2
        assert "different bases" in capsys.readouterr().err
    finally:
        meta_file.write_text(original)
    assert main(args + ["--adapter", str(folder / "a"), "--adapter", str(folder / "b"), "--method", "ties",
                        "--weights", "0.5", "--density", "0.5"]) == 2
    assert "1 weight(s) for 2 adapter(s)" in capsys.readouterr().err


def test_lossy_adapter_merges_warn_with_the_truncation_error(base, frozen_connector_adapters, tmp_path, caplog):
    """linear (= svd) at the default rank drops part of the merged delta: a WARNING with the error; cat of
    plain LoRA inputs is exact (no warning); cat with a DoRA input says which tensors are not exact."""
    import logging

    folder = frozen_connector_adapters
    with caplog.at_level(logging.INFO, logger="vlm_lora"):
        report = merge_adapters(BASE, [folder / "a", folder / "b"], tmp_path / "linear", "linear", [1.0, 1.0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert report["max_relative_truncation_error"] > 0.01
    assert len(warnings) == 1 and "linear --as adapter is lossy" in warnings[0]
    assert f"max {report['max_relative_truncation_error']:.3g}" in warnings[0] and "--as model is exact" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm_lora"):
        report = merge_adapters(BASE, [folder / "a", folder / "b"], tmp_path / "cat", "cat", [0.5, 0.5])
    assert report["max_relative_truncation_error"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _save(base[0], tmp_path / "dora", 4, language_decoder={"rank": 2, "variant": "dora", "targets": ["q"]},
          connector={"mode": "frozen"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm_lora"):
        report = merge_adapters(BASE, [folder / "a", tmp_path / "dora"], tmp_path / "cat_dora", "cat")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cat is exact for plain LoRA inputs, but 4 tensors have a DoRA input" in warnings[0]
    assert "q_proj" in warnings[0] and report["max_relative_truncation_error"] > 0


def test_merge_refuses_out_on_an_input_bad_t_and_ignored_options_in_one_error(frozen_connector_adapters, tmp_path,
                                                                             capsys):
    folder = frozen_connector_adapters
    two = ["merge", "--base", BASE, "--adapter", str(folder / "a"), "--adapter", str(folder / "b")]
    assert main(two + ["--method", "linear", "--density", "0.5", "--t", "0.2", "--out", str(folder / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 3
    assert f"--out {folder / 'b'} is the --adapter folder" in err
    assert "--density has no effect with --method linear; it is read only by: ties, dare_linear" in err
    assert "--t has no effect with --method linear; it is read only by: slerp" in err
    assert main(two + ["--method", "slerp", "--t", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--t must be in [0, 1] (0 = the first adapter, 1 = the second), got 1.5" in capsys.readouterr().err
    assert main(two + ["--method", "ties", "--t", "0.3", "--out", str(tmp_path / "x")]) == 2
    assert "--t has no effect with --method ties; it is read only by: slerp" in capsys.readouterr().err
    assert main(two + ["--method", "cat", "--rank", "4", "--seed", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--rank has no effect with --method cat" in err and "--seed has no effect with --method cat" in err
    assert main(two + ["--method", "svd", "--rank", "4", "--as", "model", "--out", str(tmp_path / "x")]) == 2
    assert "--rank has no effect with --as model" in capsys.readouterr().err
    one = ["merge", "--base", BASE, "--adapter", str(folder / "a")]
    assert main(one + ["--out", BASE]) == 2
    assert "is the --base folder" in capsys.readouterr().err
    assert main(one + ["--density", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--density has no effect with a plain merge (no --method)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
