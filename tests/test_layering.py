"""The web side and shared code never import the worker or the ML stack."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML = {"torch", "diffusers", "transformers", "accelerate"}


def imported_modules(path: Path) -> set[str]:
    """Top-level package names a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def py_files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no .py files under {package}/"
    return files


@pytest.mark.parametrize("package", ["shared", "web"])
def test_no_worker_or_ml_imports(package):
    offenders = {
        str(path.relative_to(REPO)): sorted(bad)
        for path in py_files(package)
        if (bad := imported_modules(path) & (ML | {"worker"}))
    }
    assert offenders == {}


def test_shared_does_not_import_web():
    offenders = [str(p.relative_to(REPO)) for p in py_files("shared") if "web" in imported_modules(p)]
    assert offenders == []


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch.nn\nfrom worker.runners import x\nfrom . import y\ndef f():\n    import diffusers\n")
    assert imported_modules(sample) == {"torch", "worker", "diffusers"}


def test_importing_the_web_side_loads_no_torch_or_worker():
    code = (
        "import web, web.api, web.pages, shared.jobs, shared.cli; import sys; "
        "assert 'torch' not in sys.modules and 'worker' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
