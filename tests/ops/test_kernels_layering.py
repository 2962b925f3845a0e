"""`kernels/` is a leaf: the ops import the kernels, never the other way round, and the
layout helpers the ops share with the kernels' host code import no Triton."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imported_modules(path: Path):
    """Every module a file imports, statically or through importlib.import_module / __import__."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.args[0].value


def _top(name: str) -> str:
    return name.split(".")[0]


def test_kernels_import_nothing_from_mixfast():
    files = sorted(KERNELS.glob("*.py"))
    assert {"mix.py", "infonce.py", "layout.py"} <= {f.name for f in files}
    offending = {f.name: m for f in files for m in _imported_modules(f) if _top(m) == "mixfast" or m.startswith("..")}
    assert not offending, offending


def test_layout_helpers_do_not_need_triton():
    assert "triton" not in {_top(m) for m in _imported_modules(KERNELS / "layout.py")}


def test_the_import_check_sees_every_import_form(tmp_path):
    """The scan must flag each way a kernel module could reach mixfast, or the tests above prove nothing."""
    sample = tmp_path / "sample.py"
    forms = ["import mixfast", "import mixfast.ops.mix as m", "from mixfast.ops import mix",
             "def f():\n    from mixfast.ops.mix import _out_format", "importlib.import_module('mixfast.ops')",
             "__import__('mixfast')"]
    for form in forms:
        sample.write_text(form + "\n")
        assert any(_top(m) == "mixfast" for m in _imported_modules(sample)), form
