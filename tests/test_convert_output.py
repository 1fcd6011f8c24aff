"""convert refuses an output folder that holds anything (another adapter above all) unless --force, as fuse and
train refuse theirs; forced, the folder ends up holding exactly the converted adapter."""

import pytest
from tiny_llm import make_model_folder, make_smoa_adapter

from smoa_mlx import load_adapter
from smoa_mlx.convert import hira_to_smoa, smoa_to_hira
from smoa_mlx.convert.__main__ import main as convert_main
from smoa_mlx.errors import SavePathExistsError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_out")
    model = make_model_folder(root / "model", seed=4)
    return model, make_smoa_adapter(model, root / "a", seed=1), make_smoa_adapter(model, root / "b", seed=2)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_cli_refuses_a_folder_holding_another_adapter(tiny, tmp_path, capsys):
    model, a, b = tiny
    target = _copy(b, tmp_path / "b")
    before = _contents(target)
    assert convert_main(["to-hira", str(a), str(target), "--model-type", "llama"]) == 2
    err = capsys.readouterr().err
    assert f"output folder {target} already holds adapter_config.json, adapters.safetensors" in err
    assert "pass --force" in err
    assert _contents(target) == before  # B's SMoA adapter still loads as it was

    assert convert_main(["to-hira", str(a), str(target), "--model-type", "llama", "--force"]) == 0
    assert sorted(_contents(target)) == ["adapter_config.json", "adapter_model.safetensors"]  # no stale SMoA weights
    back = hira_to_smoa(target, tmp_path / "back", model_type="llama")  # the folder is one readable PEFT adapter
    assert (back / "adapters.safetensors").is_file()


def test_api_refuses_too_and_an_empty_folder_is_fine(tiny, tmp_path):
    model, a, b = tiny
    (tmp_path / "empty").mkdir()
    smoa_to_hira(a, tmp_path / "empty", model_type="llama")
    with pytest.raises(SavePathExistsError, match="already holds adapter_config.json, adapter_model.safetensors"):
        smoa_to_hira(a, tmp_path / "empty", model_type="llama")
    smoa_to_hira(a, tmp_path / "empty", model_type="llama", force=True)
    # Forced the other way: PEFT -> SMoA into a PEFT folder leaves an SMoA adapter alone in it.
    smoa_to_hira(b, tmp_path / "peft_b", model_type="llama")
    hira_to_smoa(tmp_path / "peft_b", tmp_path / "empty", model_type="llama", force=True)
    assert sorted(_contents(tmp_path / "empty")) == ["adapter_config.json", "adapters.safetensors"]
    import mlx_lm

    loaded, _ = mlx_lm.load(str(model))
    load_adapter(loaded, tmp_path / "empty")


def test_an_output_folder_held_by_another_writer_is_refused(tiny, tmp_path, capsys):
    """Two conversions into one folder: the second is refused by name, even with --force, and touches nothing."""
    from smoa_mlx.folder_lock import FolderLock

    model, a, b = tiny
    target = _copy(b, tmp_path / "b")
    before = _contents(target)
    with FolderLock(target, "a test"):
        assert convert_main(["to-hira", str(a), str(target), "--model-type", "llama", "--force"]) == 2
        assert f"output folder {target} is in use by another run (pid " in capsys.readouterr().err
        assert {k: v for k, v in _contents(target).items() if k != ".smoa_mlx.lock"} == before
    assert _contents(target) == before
    # A new folder: the refused run leaves none behind; once free, the lock it takes is not counted as content.
    fresh = tmp_path / "fresh"
    with FolderLock(fresh, "a test"):
        assert convert_main(["to-hira", str(a), str(fresh), "--model-type", "llama"]) == 2
    assert not fresh.exists()
    assert convert_main(["to-hira", str(a), str(fresh), "--model-type", "llama"]) == 0
    assert sorted(_contents(fresh)) == ["adapter_config.json", "adapter_model.safetensors"]
