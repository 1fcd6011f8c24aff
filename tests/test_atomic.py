"""smoa_mlx.atomic: a full disk leaves the previous adapter intact with one named error; stale temp files of dead
writers are removed by the next write into the folder, live writers' are not."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models import llama

from smoa_mlx import SMoAConfig, apply_smoa, save_adapter, smoa_layers
from smoa_mlx.atomic import TMP_PREFIX, atomic_write_text, staged_folder
from smoa_mlx.errors import DiskFullError, SMoAError


def _model(hidden: int = 64, rank: int = 4):
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=2, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64, tie_word_embeddings=True,
    ))
    config = SMoAConfig(rank=rank, target_modules=["q_proj", "v_proj"])
    apply_smoa(model, config)
    return model, config


def _perturb(model):
    for layer in smoa_layers(model).values():
        layer.smoa_b = [b + 1.0 for b in layer.smoa_b]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (as root), else skip: the real ENOSPC and MLX's own short-write error."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Fill the disk to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_disk_full_keeps_the_previous_adapter(tiny_disk):
    model, config = _model()
    folder = tiny_disk / "adapter"
    save_adapter(model, folder, config)
    good = _snapshot(folder)
    _fill(tiny_disk)
    _perturb(model)
    with pytest.raises(DiskFullError, match=rf"disk full while writing {folder}/adapters.safetensors; "
                                            "the previous adapter is intact"):
        save_adapter(model, folder, config)
    assert _snapshot(folder) == good  # both files, untouched, and no temporary file left


def test_disk_full_reported_by_mlx_or_python_is_one_named_error(tmp_path, monkeypatch):
    """Without a tmpfs: MLX's "[write] Unable to write" and OSError(ENOSPC), injected, both become DiskFullError."""
    model, config = _model()
    save_adapter(model, tmp_path, config)
    good = _snapshot(tmp_path)
    _perturb(model)

    def mlx_short_write(path, arrays, metadata=None):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[write] Unable to write 334556 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", mlx_short_write)
    with pytest.raises(DiskFullError, match="the previous adapter is intact") as e:
        save_adapter(model, tmp_path, config)
    assert isinstance(e.value, SMoAError) and isinstance(e.value, OSError)
    assert _snapshot(tmp_path) == good
    monkeypatch.undo()

    def enospc(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", enospc)
    with pytest.raises(DiskFullError, match=r"adapter_config.json; the previous adapter is intact"):
        save_adapter(model, tmp_path, config)
    assert _snapshot(tmp_path) == good


def test_disk_full_while_staging_a_folder_leaves_nothing(tiny_disk):
    target = tiny_disk / "model"
    with pytest.raises(DiskFullError, match=f"disk full while writing {target}"):
        with staged_folder(target, what="model folder") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * (1 << 20))
    assert sorted(p.name for p in tiny_disk.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / f"{TMP_PREFIX}{_dead_pid()}-{uuid.uuid4().hex[:8]}-adapters.safetensors"
    dead_dir = tmp_path / f"{TMP_PREFIX}{_dead_pid()}-{uuid.uuid4().hex[:8]}-fused"
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}-{uuid.uuid4().hex[:8]}-adapter_config.json"  # a live process
    foreign = tmp_path / ".adapters.abc.tmp"  # not this project's name: left alone
    for p in (dead, live, foreign):
        p.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "config.json").write_text("{}")
    atomic_write_text(tmp_path / "note.txt", "hello")
    assert not dead.exists() and not dead_dir.exists()
    assert live.exists() and foreign.exists()
    assert (tmp_path / "note.txt").read_text() == "hello"


def test_temp_names_are_recognisable_while_writing(tmp_path, monkeypatch):
    seen = []

    def spy(path, arrays, metadata=None):
        seen.append(Path(path).name)
        raise KeyboardInterrupt  # a Ctrl-C mid-save

    model, config = _model()
    monkeypatch.setattr(mx, "save_safetensors", spy)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path, config)
    assert seen[0].startswith(f"{TMP_PREFIX}{os.getpid()}-") and seen[0].endswith("-adapters.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_of_another_shape_never_appears_beside_the_old_config(tmp_path, monkeypatch):
    """Saving over an adapter of another shape (train --force, another --rank): at every rename, where a kill could
    stop the save, the folder holds the old pair, the new pair, or weights without a config (no adapter), never
    new weights beside the old config. Saving the same adapter again with another training record keeps a config
    in the folder at every moment (a kill there leaves a pair that loads, as within one run)."""
    folder = tmp_path / "adapter"
    old_model, old_config = _model()
    save_adapter(old_model, folder, old_config, {"training": {"iters": 1}})
    old = _snapshot(folder)
    new_model, new_config = _model(rank=8)
    _perturb(new_model)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(_snapshot(folder))
        real_replace(src, dst)
        seen.append(_snapshot(folder))

    def pair(files):
        return files.get("adapter_config.json"), files.get("adapters.safetensors")

    def consistent(files):  # no config is no adapter; a config goes with its own weights
        return "adapter_config.json" not in files or pair(files) in (pair(old), pair(new))

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        save_adapter(new_model, folder, new_config, {"training": {"iters": 2}})
    new = _snapshot(folder)
    assert pair(new) != pair(old) and len(seen) == 4
    assert all(consistent(files) for files in seen)
    assert any("adapter_config.json" not in files for files in seen)  # the old config went first

    seen.clear()
    _perturb(new_model)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        save_adapter(new_model, folder, new_config, {"training": {"iters": 3}})
    assert len(seen) == 4 and all("adapter_config.json" in files for files in seen)
    assert _snapshot(folder)["adapters.safetensors"] != new["adapters.safetensors"]
