"""scripts/make_tiny_models.py: nothing lands in assets/ unless --assets asks for it; --help lists every family."""

import importlib.util

import pytest

from conftest import REPO


@pytest.fixture
def script(monkeypatch):
    """The script as a module, its writers replaced by recorders (nothing is written)."""
    from vlm_lora.architectures import tiny_models, tiny_processors

    spec = importlib.util.spec_from_file_location("make_tiny_models", REPO / "scripts" / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.written = []
    monkeypatch.setattr(tiny_models, "save_tiny_blip2", lambda path: module.written.append(path) or path)
    monkeypatch.setattr(module, "save_tiny_vit", lambda path: module.written.append(path) or path)
    monkeypatch.setattr(tiny_processors, "save_tiny_family", lambda family, path: module.written.append(path) or path)
    return module


def test_missing_out_is_refused_and_assets_only_when_asked(script, tmp_path, capsys):
    for argv, says in (([], "--out DIR is required (or --assets"), (["--family", "gemma3"], "--out DIR is required"),
                       (["--assets", "--out", str(tmp_path)], "drop --out and --family")):
        with pytest.raises(SystemExit) as info:
            script.main(argv)
        assert info.value.code == 2 and says in capsys.readouterr().err
    assert script.written == []
    script.main(["--family", "gemma3", "--out", str(tmp_path / "g")])
    script.main(["--out", str(tmp_path)])
    script.main(["--assets"])
    assert script.written == [tmp_path / "g", tmp_path / "tiny-blip2", tmp_path / "tiny-vit",
                              REPO / "assets" / "tiny-blip2", REPO / "assets" / "tiny-vit"]


def test_help_lists_every_family(script, capsys):
    from vlm_lora.architectures.tiny_processors import STYLE

    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    assert all(family in text for family in [*STYLE, "open_clip"]) and "--assets" in text
