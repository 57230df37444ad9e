"""The package's import direction: a lower part of vlm_lora never imports a higher one.

Every ``import`` in every module is read from the source (lazy imports inside functions too), so a
new circle fails here, not as an ImportError at some user's first call.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlm_lora"

# lower number = lower layer; a module may import its own part and any part with a smaller number
LAYERS = {
    "lora": 0, "metrics": 0, "data": 0, "architectures": 0,
    "policy": 1, "modeling": 1,
    "planner": 2, "quantize": 2, "recipe": 2,
    "adapters": 3,
    "eval": 4,
    "train": 5,
    "errors": 6, "__init__": 6, "cli": 7, "__main__": 8,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlm_lora"):
            if node.module == "vlm_lora":  # from vlm_lora import planner
                found |= {f"vlm_lora.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vlm_lora.")}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    relative = path.relative_to(PACKAGE)
    own = relative.parts[0] if len(relative.parts) > 1 else relative.stem
    assert own in LAYERS, f"{relative}: add its part to LAYERS in this test"
    for imported in _imports(path):
        part = _part(imported)
        if part == own:
            continue
        assert part in LAYERS, f"{relative} imports {imported}, a part this test does not know"
        assert LAYERS[part] < LAYERS[own], f"{relative} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[part]})"


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.parent.name}/__init__.py needs a docstring saying what it owns and imports"
