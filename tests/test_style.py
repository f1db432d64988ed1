import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([ruff, "check", "--output-format", "concise", "mixchat", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_is_instant_because_the_package_imports_nothing_heavy():
    proc = subprocess.run([sys.executable, "-c", "import mixchat.frontends.cli, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "False"
