"""mlx-lm's own flags, as users pass them to mlx_lm.lora / fuse / generate, work here too; --help shows defaults."""

import argparse
import json

import mlx_lm
import pytest
from mlx_lm.tuner.callbacks import SUPPORT_CALLBACK, TrainingCallback
from tiny_llm import make_model_folder, make_smoa_adapter
from train_helpers import build_data_folder

from smoa_mlx import chat, cli, fuse, generate
from smoa_mlx.errors import OptionError
from smoa_mlx.train import args as train_args
from smoa_mlx.train import run
from smoa_mlx.train.checkpoint import load_state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    dense = make_model_folder(root / "dense", seed=5)
    q4 = make_model_folder(root / "q4", quantize_bits=4, seed=5)
    return {"dense": dense, "q4": q4, "data": build_data_folder(root / "data"),
            "dense_adapter": make_smoa_adapter(dense, root / "dense_adapter"),
            "q4_adapter": make_smoa_adapter(q4, root / "q4_adapter")}


def _train(tiny, path, **kw):
    opts = dict(model=str(tiny["dense"]), data=str(tiny["data"]), adapter_path=str(path), iters=4, batch_size=2,
                steps_per_report=2, steps_per_eval=2, save_every=4, val_batches=1, learning_rate=5e-3, warmup=0,
                dropout=0.0, seed=0)
    opts.update(kw)
    return run(opts)


# -- train ----------------------------------------------------------------------------------------------------
def test_grad_accumulation_steps_reach_mlx_lm(tiny, tmp_path):
    _train(tiny, tmp_path / "acc", grad_accumulation_steps=2)
    _, optimizer_state = load_state(tmp_path / "acc")
    assert int(optimizer_state["step"].item()) == 2  # 4 batches, one optimizer step per 2
    _train(tiny, tmp_path / "plain")
    _, optimizer_state = load_state(tmp_path / "plain")
    assert int(optimizer_state["step"].item()) == 4
    config = json.loads((tmp_path / "acc" / "adapter_config.json").read_text())
    assert config["training"]["grad_accumulation_steps"] == 2
    assert train_args.parse_args(["--grad-accumulation-steps", "4"]).grad_accumulation_steps == 4
    with pytest.raises(OptionError, match=r"--iters 200 must be a multiple of --grad-accumulation-steps 3"):
        train_args.parse_args(["--iters", "200", "--grad-accumulation-steps", "3"])  # (the CPU default is 20)
    with pytest.raises(OptionError, match=r"--save-every 10 must be a multiple of --grad-accumulation-steps 4"):
        train_args.parse_args(["--grad-accumulation-steps", "4", "--save-every", "10"])
    with pytest.raises(OptionError, match=r"--grad-accumulation-steps must be a positive integer, got 0"):
        train_args.parse_args(["--grad-accumulation-steps", "0"])


class Probe(TrainingCallback):
    """A reporting service as mlx-lm's wandb / swanlab callbacks are built (same constructor)."""

    made: list = []

    def __init__(self, project_name, log_dir, config, wrapped_callback=None):
        self.train, self.val = [], []
        Probe.made.append((self, project_name, log_dir, config))

    def on_train_loss_report(self, info):
        self.train.append((info["iteration"], info["train_loss"]))

    def on_val_loss_report(self, info):
        self.val.append((info["iteration"], info["val_loss"]))


def test_report_to_uses_mlx_lms_callbacks(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(SUPPORT_CALLBACK, "probe", Probe)
    Probe.made.clear()
    result = _train(tiny, tmp_path / "r", report_to="probe", project_name="demo")
    (probe, project, log_dir, config), = Probe.made
    assert (project, log_dir, config["iters"]) == ("demo", str(tmp_path / "r"), 4)
    assert [(s, pytest.approx(l)) for s, l in probe.train] == [tuple(x) for x in result["train_losses"]]
    assert [(s, pytest.approx(l)) for s, l in probe.val] == [tuple(x) for x in result["val_losses"]]
    with pytest.raises(OptionError, match=r"--report-to: unknown service 'tensorboard' \(known: wandb, swanlab"):
        train_args.parse_args(["--report-to", "tensorboard"])


def test_report_to_a_missing_package_fails_before_loading(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(OptionError, match=r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"):
        train_args.parse_args(["--report-to", "wandb"])


# -- fuse -----------------------------------------------------------------------------------------------------
def test_fuse_dequantize_flags(tiny, tmp_path, capsys):
    q4, adapter = tiny["q4"], tiny["q4_adapter"]
    base = ["--model", str(q4), "--adapter-path", str(adapter)]
    assert fuse.main(base + ["--save-path", str(tmp_path / "kept"), "--no-dequantize"]) == 0
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (4, 32)  # the base's own
    assert fuse.main(base + ["--save-path", str(tmp_path / "dense"), "--dequantize"]) == 0
    assert "quantization" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    with pytest.raises(SystemExit):
        fuse.main(base + ["--save-path", str(tmp_path / "x"), "--dequantize", "-q"])
    assert "--dequantize and --quantize contradict" in capsys.readouterr().err

    dense = ["--model", str(tiny["dense"]), "--adapter-path", str(tiny["dense_adapter"])]
    assert fuse.main(dense + ["--save-path", str(tmp_path / "d"), "--no-dequantize"]) == 0
    assert "the base is not quantized, so the fused model stays dense" in capsys.readouterr().err
    assert "quantization" not in json.loads((tmp_path / "d" / "config.json").read_text())


# -- generate / chat ----------------------------------------------------------------------------------------------
def test_ignore_chat_template_is_raw_prompt(tiny, capsys):
    argv = ["--model", str(tiny["dense"]), "--prompt", "what is the color", "-m", "5"]
    assert generate.main(argv + ["--raw-prompt"]) == 0
    raw = capsys.readouterr().out
    assert generate.main(argv + ["--ignore-chat-template"]) == 0
    assert capsys.readouterr().out == raw
    model, tok = mlx_lm.load(str(tiny["dense"]))
    assert raw == mlx_lm.generate(model, tok, tok.encode("what is the color"), max_tokens=5) + "\n"


def test_top_k_and_min_p_reach_the_sampler(tiny, capsys, monkeypatch):
    argv = ["--model", str(tiny["dense"]), "--prompt", "is the grass green", "-m", "8"]
    assert generate.main(argv) == 0
    greedy = capsys.readouterr().out
    for seed in ("1", "2"):  # top-k 1 keeps only the most likely token: greedy, whatever the temperature
        assert generate.main(argv + ["--temp", "5", "--top-k", "1", "--seed", seed]) == 0
        assert capsys.readouterr().out == greedy
    seen = {}
    real = cli.make_sampler
    monkeypatch.setattr(cli, "make_sampler", lambda **kw: seen.update(kw) or real(**kw))
    cli.sampler_from_args(argparse.Namespace(temp=0.7, top_p=0.9, min_p=0.05, top_k=40, seed=0))
    assert seen == {"temp": 0.7, "top_p": 0.9, "min_p": 0.05, "top_k": 40}
    for bad, message in ((["--top-k", "-1"], "--top-k must be >= 0"), (["--min-p", "1"], "--min-p must be in [0, 1)")):
        with pytest.raises(SystemExit):
            generate.main(argv + bad)
        assert message in capsys.readouterr().err


# -- --help ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser", [train_args.build_parser, fuse.build_parser, chat.build_parser,
                                    generate.build_parser], ids=["train", "fuse", "chat", "generate"])
def test_help_shows_every_default(parser):
    p = parser()
    missing = [
        a.option_strings[0] for a in p._actions
        if a.option_strings and not a.required and a.nargs != 0 and "default" not in (a.help or "")
        and not isinstance(a, argparse._HelpAction)
    ]
    assert missing == []
    assert "--top-k" in p.format_help() or parser in (train_args.build_parser, fuse.build_parser)
