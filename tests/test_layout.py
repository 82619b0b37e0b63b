"""The import directions docs/design.md draws ("Layout"), checked so the drawing cannot rot.

Packages, bottom up: data (images, formulas, files) <- model (the network) <- training (a run);
im2latex (the reading API) sits beside model, its torch-free core below it. Scripts at the top
level import all of them; no package imports a script.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "model", "training", "im2latex", "bench")
SCRIPTS = frozenset(p.stem for p in ROOT.glob("*.py"))

# Each package and the project modules it may import (a package name allows all of it).
ALLOWED = {
    "data": {"data"},
    "model": {"model", "data", "im2latex.decoding", "im2latex.prediction"},
    "training": {"training", "model", "data"},
    "im2latex": {"im2latex", "data", "model"},
    "bench": {"bench", "data", "model", "training", "im2latex"},
}
# im2latex imports model only to export it, and inside the PyTorch backend when it is built.
MODEL_USERS_IN_IM2LATEX = {"im2latex.onnx_export", "im2latex.api"}

# Modules that must import without torch: the ONNX Runtime path and the data tools run where
# torch is not installed.
TORCH_FREE = ["im2latex", "im2latex.prediction", "im2latex.decoding", "im2latex.confidence",
              "im2latex.onnx_backend", "im2latex.api"] + sorted(
    f"data.{p.stem}" for p in (ROOT / "data").glob("*.py")
    if p.stem not in ("__init__", "dataset"))  # dataset.py is torch's Dataset


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES or n in SCRIPTS}
    return found


def allowed(package: str, name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ALLOWED[package])


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package):
    wrong = []
    for path in sorted((ROOT / package).glob("*.py")):
        module = f"{package}.{path.stem}"
        for name in project_imports(path):
            if name.split(".")[0] in SCRIPTS and name.split(".")[0] not in PACKAGES:
                wrong.append(f"{module} imports the script {name}")
            elif not allowed(package, name):
                wrong.append(f"{module} imports {name}")
            elif (package == "im2latex" and name.split(".")[0] == "model"
                  and module not in MODEL_USERS_IN_IM2LATEX):
                wrong.append(f"{module} imports {name} (only export and the torch backend may)")
    assert not wrong, "imports against docs/design.md's layout:\n" + "\n".join(wrong)


def test_rule_checker_sees_a_wrong_import(tmp_path):
    """The checker itself: an upward import is caught, lazy or not."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from training.loop import Trainer\n    import serve\n")
    assert project_imports(bad) == {"training.loop", "serve"}
    assert not allowed("model", "training.loop") and allowed("model", "im2latex.decoding")
    assert not allowed("model", "im2latex.api") and allowed("training", "model.search")


# A process in which `import torch` fails as it does where torch is not installed: a finder
# that refuses it (sys.modules["torch"] = None would also do, but libraries such as scipy then
# see a "torch" module and probe it).
NO_TORCH = """import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"no module named {name!r} (refused by the test)")
sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_torch_free_modules_import_without_torch():
    """Where torch is missing, the torch-free modules still import."""
    p = run_without_torch(f"import importlib\nfor m in {TORCH_FREE!r}:\n"
                          "    importlib.import_module(m)\nprint('ok')")
    assert p.returncode == 0 and p.stdout.startswith("ok"), p.stderr[-2000:]


def test_torch_really_is_refused_in_that_process():
    """The check above would pass vacuously if the finder did not block torch."""
    p = run_without_torch("import data.dataset\n")
    assert p.returncode != 0 and "refused by the test" in p.stderr
