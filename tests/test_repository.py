""".gitignore keeps the README examples' outputs out of git and never hides a file of the package."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the README's examples and the CLI defaults write into the repository root.
EXAMPLE_OUTPUTS = ("adapters", "fused_model", "fused_model-hf", "smollm2-135m", "hira_adapter")


def _ignored(paths: list[str]) -> list[str]:
    """The paths .gitignore matches, tracked or not (--no-index: a pattern hiding a tracked file counts too)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths), capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.stdout.split()


def test_example_outputs_are_ignored():
    paths = [f"{name}/model.safetensors" for name in EXAMPLE_OUTPUTS]
    assert _ignored(paths) == paths


def test_no_source_file_is_ignored():
    files = [
        str(p.relative_to(ROOT))
        for top in ("smoa_mlx", "tests", "scripts", "docs", "benchmarks")
        for p in (ROOT / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    assert any(f.startswith("smoa_mlx/adapters/") for f in files)
    assert _ignored(files) == []
