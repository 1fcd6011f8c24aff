"""The adapter folder's one owner (smoa_mlx.adapters.folder): adapters made by the real training CLI carry the base
fingerprint and are refused on another base in every entry point; every writer's folder is read by every reader.

"Another base" is the same tiny llama architecture with other random weights: every shape matches, so only the
recorded fingerprint can tell them apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from train_helpers import build_data_folder, build_model_folder

from smoa_mlx import BaseModelMismatchError, SMoAConfig, SMoAError, apply_smoa, load_adapter, save_adapter
from smoa_mlx import chat, fuse, generate
from smoa_mlx.adapters import apply_adapter, read_adapter, recorded_base
from smoa_mlx.cli import run as cli_run
from smoa_mlx.convert.__main__ import main as convert_main
from smoa_mlx.errors import AdapterError, OptionError
from smoa_mlx.loading import load_model, load_model_with_adapter
from smoa_mlx.train import main as train_main
from smoa_mlx.train import run as train_run

TOKENS = mx.array([[3, 10, 20, 33, 41, 2, 4, 12]])
MISMATCH = "trained on a different base model"


def _train_opts(base: Path, data: Path, folder: Path, kind: str) -> dict:
    return dict(model=str(base), data=str(data), adapter_path=str(folder), fine_tune_type=kind, iters=2,
                batch_size=2, steps_per_report=1, steps_per_eval=100, save_every=100, val_batches=1,
                learning_rate=5e-2, warmup=0, rank=4)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base, another base of the same shapes, and adapters of every kind made by the training command."""
    root = tmp_path_factory.mktemp("folder")
    base = build_model_folder(root / "base", seed=0)
    other = build_model_folder(root / "other", seed=1)
    data = build_data_folder(root / "data", n_train=8, n_valid=4)
    adapters = {}
    smoa = root / "cli_smoa"  # through the command line itself
    assert train_main(["--model", str(base), "--data", str(data), "--adapter-path", str(smoa), "--iters", "2",
                       "--batch-size", "2", "--steps-per-eval", "100", "--val-batches", "1", "--rank", "4",
                       "--learning-rate", "5e-2", "--warmup", "0"]) == 0
    adapters["cli_smoa"] = smoa
    for kind in ("hira", "lora", "dora"):
        train_run(_train_opts(base, data, root / f"cli_{kind}", kind))
        adapters[f"cli_{kind}"] = root / f"cli_{kind}"
    return {"root": root, "base": base, "other": other, "adapters": adapters}


def _stderr_of(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize("name", ["cli_smoa", "cli_hira", "cli_lora", "cli_dora"])
def test_cli_adapters_record_their_base(made, name):
    data = json.loads((made["adapters"][name] / "adapter_config.json").read_text())
    assert data["fine_tune_type"] == name[4:]
    assert data["model"] == str(made["base"].resolve())
    assert set(data["base_fingerprint"]["modules"]) and all(
        p.startswith("model.layers.") for p in data["base_fingerprint"]["modules"]
    )
    if name in ("cli_smoa", "cli_hira"):
        assert data["smoa_parameters"]["rank"] == 4 and data["lora_parameters"]["rank"] == 4


@pytest.mark.parametrize("name", ["cli_smoa", "cli_lora"])
def test_cli_adapter_refused_on_other_base_by_the_api(made, name):
    adapter = made["adapters"][name]
    other, _ = load_model(str(made["other"]))
    before = {k for k, _ in other.named_modules()}
    with pytest.raises(BaseModelMismatchError, match=MISMATCH):
        apply_adapter(other, adapter)
    assert {k for k, _ in other.named_modules()} == before  # refused before anything changed
    if name == "cli_smoa":
        with pytest.raises(BaseModelMismatchError, match=MISMATCH):
            load_adapter(other, adapter)
    with pytest.raises(BaseModelMismatchError, match=MISMATCH):
        load_model_with_adapter(str(made["other"]), adapter)
    apply_adapter(load_model(str(made["base"]))[0], adapter)  # and accepted on its own base


@pytest.mark.parametrize("name", ["cli_smoa", "cli_lora"])
def test_cli_adapter_refused_on_other_base_by_fuse_chat_generate(made, name, tmp_path, capsys):
    adapter, other = str(made["adapters"][name]), str(made["other"])
    out = tmp_path / "fused"
    assert cli_run(fuse.main, "smoa_mlx.fuse", ["--model", other, "--adapter-path", adapter, "--save-path", str(out)]) == 2
    assert MISMATCH in _stderr_of(capsys) and not out.exists()
    assert cli_run(chat.main, "smoa_mlx.chat", ["--model", other, "--adapter-path", adapter]) == 2
    assert MISMATCH in _stderr_of(capsys)
    argv = ["--model", other, "--adapter-path", adapter, "--prompt", "hi", "--max-tokens", "2"]
    assert cli_run(generate.main, "smoa_mlx.generate", argv) == 2
    assert MISMATCH in _stderr_of(capsys)


@pytest.mark.parametrize("name,direction", [("cli_smoa", "to-hira"), ("cli_lora", "to-peft")])
def test_cli_adapter_refused_on_other_base_by_convert(made, name, direction, tmp_path, capsys):
    adapter = str(made["adapters"][name])
    assert convert_main([direction, adapter, str(tmp_path / "bad"), "--base", str(made["other"])]) == 2
    assert MISMATCH in _stderr_of(capsys) and not (tmp_path / "bad").exists()
    assert convert_main([direction, adapter, str(tmp_path / "ok"), "--base", str(made["base"])]) == 0


def test_generate_without_model_uses_the_recorded_base_and_says_so(made, capsys):
    argv = ["--adapter-path", str(made["adapters"]["cli_smoa"]), "--prompt", "the cat", "--max-tokens", "2"]
    assert cli_run(generate.main, "smoa_mlx.generate", argv) == 0
    err = _stderr_of(capsys)
    assert f"Base model: {made['base'].resolve()} (recorded in" in err and "base fingerprint checked" in err


def test_relative_base_resolves_against_the_adapter_folder(made, tmp_path, monkeypatch):
    folder = tmp_path / "rel"
    folder.mkdir()
    for f in made["adapters"]["cli_smoa"].glob("adapter*"):
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["model"] = os.path.relpath(made["base"], folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the same relative path from here names nothing
    assert recorded_base(read_adapter(folder)) == str(made["base"].resolve())
    load_model_with_adapter(None, folder)
    config["model"] = "../no/such/model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="neither a folder relative to the adapter folder"):
        recorded_base(read_adapter(folder))
    with pytest.raises(FileNotFoundError, match=f"is a file: an adapter folder is expected; {folder} is the folder"):
        read_adapter(folder / "adapters.safetensors")


# -- every writer read by every reader ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(made):
    """Adapter folders from every writer: the training CLI (4 kinds), save_adapter, and the converters."""
    root, base = made["root"], str(made["base"])
    folders = dict(made["adapters"])
    model, _ = load_model(base)
    config = SMoAConfig(rank=4, blocks=2, target_modules=["q_proj", "down_proj"])
    mx.random.seed(0)
    apply_smoa(model, config)
    folders["save_adapter"] = save_adapter(model, root / "api_smoa", config, extra_config={"model": base})
    for direction, src, mid, back in (("to-hira", "cli_smoa", "peft_hira", "from-hira"),
                                      ("to-peft", "cli_dora", "peft_dora", "from-peft"),
                                      ("to-reference", "cli_smoa", "ref_smoa", "from-reference")):
        assert convert_main([direction, str(folders[src]), str(root / mid), "--base", base]) == 0
        assert convert_main([back, str(root / mid), str(root / f"{back}_{src}"), "--base", base]) == 0
        folders[f"{back}_{src}"] = root / f"{back}_{src}"
    return folders


READERS_BY_KIND = {"smoa": "to-hira", "hira": "to-hira", "lora": "to-peft", "dora": "to-peft"}


@pytest.mark.filterwarnings("ignore::smoa_mlx.convert.FragileGroupingWarning")  # the tiny random base has near ties
def test_every_writer_is_read_by_every_reader(made, written, tmp_path):
    base = str(made["base"])
    assert len(written) == 8
    for name, folder in written.items():
        adapter = read_adapter(folder)
        assert adapter.fingerprint, name  # every writer records (or carries over) the base fingerprint
        model, _ = load_model(base)
        apply_adapter(model, folder)  # the API, and through it fuse / chat / generate
        live = model(TOKENS)
        with pytest.raises(BaseModelMismatchError):
            apply_adapter(load_model(str(made["other"]))[0], folder)
        assert convert_main([READERS_BY_KIND[adapter.kind], str(folder), str(tmp_path / name), "--base", base]) == 0
        fused = tmp_path / f"{name}_fused"
        assert fuse.main(["--model", base, "--adapter-path", str(folder), "--save-path", str(fused)]) == 0
        assert np.allclose(np.array(mlx_lm.load(str(fused))[0](TOKENS)), np.array(live), atol=1e-4), name
        if adapter.kind in ("lora", "dora"):  # and stock mlx-lm reads what this package writes
            stock, _ = mlx_lm.load(base, adapter_path=str(folder))
            assert np.allclose(np.array(stock(TOKENS)), np.array(live), atol=1e-5), name


# -- hyperparameters: one place checks them ---------------------------------------------------------------
def test_hyperparameters_are_checked_in_one_place_with_the_users_names(tmp_path):
    from smoa_mlx.layer import SMoALinear
    from smoa_mlx.train.args import parse_args

    with pytest.raises(OptionError, match=r"--blocks 16 is more than --rank 8: 8 of the blocks would get rank 0"):
        parse_args(["--blocks", "16"])
    with pytest.raises(OptionError, match=r"--rank must be >= 1, got 0"):
        parse_args(["--rank", "0"])
    with pytest.raises(OptionError, match=r"SMoAConfig: rank must be >= 1, got 0"):
        SMoAConfig(rank=0)
    with pytest.raises(OptionError, match=r"SMoAConfig: blocks 3 is more than rank 2"):
        SMoAConfig(rank=2, blocks=3)
    SMoAConfig(rank=2, blocks=3, branch_ranks=[1, 1, 0])  # an explicitly empty block is the user's choice
    import mlx.nn as nn

    with pytest.raises(OptionError, match=r"attn: blocks 3 is more than rank 2"):
        SMoALinear.from_base(nn.Linear(8, 8), rank=2, blocks=3, name="attn")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rank: 4\nblocks: 8\nlearning_rate: 1e-5\n")
    with pytest.raises(OptionError, match=rf"blocks \(in {yaml_file}\) 8 is more than rank \(in {yaml_file}\) 4"):
        parse_args(["-c", str(yaml_file)])
    yaml_file.write_text("rank: 4\nlearning_rate: 1e-5\n")
    assert parse_args(["-c", str(yaml_file)]).learning_rate == 1e-5  # mlx-lm's YAML loader: a float


def test_adapter_config_values_are_checked_naming_the_key(made, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    src = made["adapters"]["cli_smoa"]
    (folder / "adapters.safetensors").write_bytes((src / "adapters.safetensors").read_bytes())
    config = json.loads((src / "adapter_config.json").read_text())
    config["smoa_parameters"]["blocks"] = 1_000_000_000
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(OptionError, match=r"adapter_config.json: smoa_parameters.blocks 1000000000 is more than"):
        read_adapter(folder)
    assert issubclass(OptionError, SMoAError) and issubclass(BaseModelMismatchError, SMoAError)


def test_default_schedule_is_mlx_lms_warmup_then_cosine():
    from smoa_mlx.train.args import resolve
    from smoa_mlx.train.runner import _optimizer

    opts = resolve({"iters": 100, "warmup": 10, "learning_rate": 1e-3})
    lr = _optimizer(opts)._schedulers["learning_rate"]
    assert float(lr(mx.array(0))) == 0.0
    assert abs(float(lr(mx.array(10))) - 1e-3) < 1e-9
    assert float(lr(mx.array(60))) < 1e-3 and float(lr(mx.array(100))) < 1e-5


def test_console_scripts_run():
    import tomllib

    scripts = tomllib.loads(Path(__file__).resolve().parent.parent.joinpath("pyproject.toml").read_text())
    scripts = scripts["project"]["scripts"]
    assert set(scripts) == {"smoa-train", "smoa-fuse", "smoa-chat", "smoa-generate", "smoa-convert"}
    for entry in scripts.values():
        module, _, func = entry.partition(":")
        code = f"import sys; sys.argv = ['x', '--help']; from {module} import {func}; sys.exit({func}())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0 and "usage:" in out.stdout, (entry, out.stderr[-2000:])
