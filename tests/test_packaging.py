"""What an installed mixchat carries. CI builds the sdist and the wheel and runs the demo from a
venv outside the checkout (.ci/run); these checks catch the usual way that breaks, early."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the checks do not depend on the version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    """The package list is explicit (the demo is mapped in from assets/), so a new subpackage must be
    added to it, or the wheel would silently lack it."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mixchat").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"


def test_the_wheel_carries_every_file_of_the_demo_and_the_c_sources():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"]["mixchat.demo"] == "assets/demo"
    shipped = set(setuptools["package-data"]["mixchat.demo"])
    assert shipped == {p.name for p in (ROOT / "assets" / "demo").iterdir() if p.is_file()}
    assert {"csrc/*.c", "csrc/*.h"} <= set(setuptools["package-data"]["mixchat.speed"])
    assert {p.name for p in (ROOT / "mixchat" / "speed").glob("csrc/*.[ch]")} >= {"kernels.c", "common.h", "decode.c"}
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "graft assets/demo" in manifest and "recursive-include mixchat/speed/csrc *.c *.h" in manifest


def test_every_runtime_import_is_a_declared_dependency():
    """Test extras must not hide a missing runtime dependency (numpy once did: CI's test venv had it)."""
    declared = {d.split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("-", "_")
                for d in PYPROJECT["project"]["dependencies"]}
    needed = {"torch", "numpy", "sentencepiece", "tiktoken", "safetensors", "textual", "prompt_toolkit",
              "platformdirs"}
    assert needed <= declared
    # torch stays pinned to the CPU build that lies on disk (an open range pulls several GB of CUDA)
    assert "torch==2.13.0" in PYPROJECT["project"]["dependencies"]


def test_the_demo_is_found_in_the_package_before_the_checkout(tmp_path, monkeypatch):
    """Installed from a wheel, the demo sits beside the code (mixchat/demo); in a checkout, in assets/."""
    from mixchat import paths

    assert paths.demo_model() == ROOT / "assets" / "demo"
    installed = tmp_path / "site-packages" / "mixchat"
    (installed / "demo").mkdir(parents=True)
    (installed / "demo" / "params.json").write_text("{}")
    monkeypatch.setattr(paths, "__file__", str(installed / "paths.py"))
    assert paths.demo_model() == installed / "demo"
