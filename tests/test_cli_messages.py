"""What the commands say when the user points at the wrong thing: a weights file for a folder, an unreachable hub."""

import json

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from tiny_llm import make_model_folder, make_smoa_adapter

from smoa_mlx import SMoAConfig, apply_smoa, save_adapter
from smoa_mlx.convert.__main__ import main as convert_main
from smoa_mlx.train import main as train_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    model = make_model_folder(root / "model", seed=2)
    return model, make_smoa_adapter(model, root / "adapter")


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable, as huggingface_hub reports it when offline and the cache lacks the model."""

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub (ConnectError)")

    import huggingface_hub
    import mlx_lm.utils

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(mlx_lm.utils, "_download", unreachable)


def test_train_names_the_folder_that_holds_a_weights_file(tiny, capsys):
    _, adapter = tiny
    weights = adapter / "adapters.safetensors"
    for extra in ([], ["--resume"]):
        assert train_main(["--adapter-path", str(weights), "--iters", "2", *extra]) == 2
        err = capsys.readouterr()
        assert f"--adapter-path {weights} is a file: an adapter folder is expected; {adapter} is the folder" in err.err
        assert "Loading model" not in err.out  # refused before the model load


def test_convert_with_an_unreachable_hub_says_what_to_pass(tiny, tmp_path, offline, capsys):
    model, adapter = tiny
    embedded_adapter = tmp_path / "embedded_adapter"
    embedded_adapter.mkdir()
    for f in adapter.iterdir():
        (embedded_adapter / f.name).write_bytes(f.read_bytes())
    config = json.loads((embedded_adapter / "adapter_config.json").read_text())
    config["model"] = None  # as an adapter trained on the embedded model records it
    (embedded_adapter / "adapter_config.json").write_text(json.dumps(config))

    assert convert_main(["to-hira", str(embedded_adapter), str(tmp_path / "out"), "--base", "owner/name"]) == 2
    err = capsys.readouterr().err
    assert "--base owner/name: no such local folder, and the Hugging Face hub cannot be reached" in err
    assert "--base embedded" in err and "--model-type llama" in err
    assert "ConnectError" not in err and "Traceback" not in err and "model_type" not in err
    assert not (tmp_path / "out").exists()

    # A direction that needs the base gets no --model-type suggestion.
    assert convert_main(["to-reference", str(embedded_adapter), str(tmp_path / "out"), "--base", "owner/name"]) == 2
    err = capsys.readouterr().err
    assert "--base embedded" in err and "--model-type" not in err


def test_fuse_with_an_unreachable_hub(tiny, tmp_path, offline, capsys):
    from smoa_mlx import fuse

    _, adapter = tiny
    argv = ["--model", "owner/name", "--adapter-path", str(adapter), "--save-path", str(tmp_path / "f")]
    assert fuse.run(fuse.main, "smoa_mlx.fuse", argv) == 2
    err = capsys.readouterr().err
    assert "--model owner/name: no such local folder, and the Hugging Face hub cannot be reached" in err
    assert "Pass a local model folder to --model" in err and "ConnectError" not in err


def test_convert_uses_cli_names_and_the_recorded_base(tiny, tmp_path, capsys):
    model, adapter = tiny
    # The adapter records its (local) base: used for the checks without --base.
    assert convert_main(["to-hira", str(adapter), str(tmp_path / "h")]) == 0
    assert f"using the adapter's recorded base {model}" in capsys.readouterr().err
    # A PEFT input records nothing this package can load: the message names both flags.
    assert convert_main(["from-hira", str(tmp_path / "h"), str(tmp_path / "back")]) == 2
    assert "give --base (the base model folder or Hugging Face id) or --model-type" in capsys.readouterr().err
    assert convert_main(["to-hira", str(adapter), str(tmp_path / "h2"), "--base", str(model),
                         "--model-type", "qwen2"]) == 2
    assert f"--model-type qwen2 given, but --base {model} is a 'llama' model" in capsys.readouterr().err


def test_convert_base_embedded(tmp_path, capsys):
    """An adapter trained on the embedded model converts offline: --base embedded, or no --base at all."""
    from smoa_mlx.models import load_embedded

    model, _ = load_embedded()
    config = SMoAConfig(rank=4, target_modules=["v_proj"], num_layers=1)
    apply_smoa(model, config)
    save_adapter(model, tmp_path / "ad", config, extra_config={"model": None})
    assert convert_main(["to-hira", str(tmp_path / "ad"), str(tmp_path / "a"), "--base", "embedded"]) == 0
    assert convert_main(["to-hira", str(tmp_path / "ad"), str(tmp_path / "b")]) == 0
    assert "using the adapter's recorded base embedded" in capsys.readouterr().err
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
