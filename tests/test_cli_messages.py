"""What the commands say when the user points at the wrong thing: a weights file for a folder, an unreachable hub."""

import json

import pytest
from tiny_llm import make_model_folder, make_smoa_adapter

from smoa_mlx.train import main as train_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    model = make_model_folder(root / "model", seed=2)
    return model, make_smoa_adapter(model, root / "adapter")


def test_train_names_the_folder_that_holds_a_weights_file(tiny, capsys):
    _, adapter = tiny
    weights = adapter / "adapters.safetensors"
    for extra in ([], ["--resume"]):
        assert train_main(["--adapter-path", str(weights), "--iters", "2", *extra]) == 2
        err = capsys.readouterr()
        assert f"--adapter-path {weights} is a file: an adapter folder is expected; {adapter} is the folder" in err.err
        assert "Loading model" not in err.out  # refused before the model load
