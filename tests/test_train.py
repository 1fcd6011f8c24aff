"""python -m smoa_mlx.train: resume equality, Ctrl-C and NaN checkpoints, baselines, data and option errors.

Tiny float32 llamas built here (2 layers, hidden 64); the compiled step is cached by MLX across runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from train_helpers import build_data_folder, build_model_folder, write_jsonl

from smoa_mlx.train import runner as train_mod
from smoa_mlx.train.checkpoint import load_state
from smoa_mlx.train import run
from smoa_mlx.train.args import parse_args
from smoa_mlx.train.data import PACKAGED_DATA, DataError, load_splits, read_jsonl
from smoa_mlx.train.loop import Recorder, TrainingDiverged


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": str(build_model_folder(root / "model")), "data": str(build_data_folder(root / "data"))}


def base(tiny, path, **kw):
    opts = dict(model=tiny["model"], data=tiny["data"], adapter_path=str(path), iters=8, batch_size=4,
                steps_per_report=1, steps_per_eval=4, save_every=4, val_batches=2, learning_rate=5e-3,
                warmup=2, dropout=0.1, seed=3)
    opts.update(kw)
    return opts


def weights(path: Path, name="adapters.safetensors") -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path / name)).items()}


def test_resume_after_ctrl_c_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    full = run(base(tiny, tmp_path / "full"))

    report = Recorder.on_train_loss_report

    def interrupt_at_5(self, info):  # a Ctrl-C arriving while step 5 is reported
        report(self, info)
        if info["iteration"] + self.offset == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(Recorder, "on_train_loss_report", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        run(base(tiny, tmp_path / "cut"))
    monkeypatch.undo()
    state, _ = load_state(tmp_path / "cut")
    assert state.step == 5  # the interrupted step was saved, not only the step-4 checkpoint

    with pytest.raises(FileExistsError, match="--resume"):
        run(base(tiny, tmp_path / "cut"))
    resumed = run(base(tiny, tmp_path / "cut", resume=True))
    assert resumed["start_step"] == 5
    want = dict(map(tuple, full["train_losses"]))
    got = dict(map(tuple, resumed["train_losses"]))
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and any(k.endswith("smoa_b.0") for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.abs(a["model.layers.1.mlp.down_proj.smoa_b.0"]).max() > 0  # it trained
    # the step-4 checkpoint, the loss curve and a val loss that went down
    assert (tmp_path / "full" / "0000004_adapters.safetensors").is_file()
    assert (tmp_path / "full" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert full["final_val_loss"] < full["initial_val_loss"]
    assert full["val_losses"][-1][0] == 8
    assert 0 < full["trainable_parameters"] < full["total_parameters"]
    assert full["tokens_per_second"] > 0 and full["peak_memory_gb"] > 0


def test_resume_a_checkpoint_with_per_block_optimizer_state(tiny, tmp_path, monkeypatch):
    """Checkpoints written before a layer held its factors in one array carry the optimizer's state per block
    (``<path>.smoa_a.<k>.m``, ...): --resume packs it (train.checkpoint.packed_factor_state) and the run continues
    exactly as one never stopped. The old file is made here from a new one, each packed array split per block."""
    from smoa_mlx.train.checkpoint import STATE_FILE

    run(base(tiny, tmp_path / "full", dropout=0.0))
    report = Recorder.on_train_loss_report

    def interrupt_at_5(self, info):
        report(self, info)
        if info["iteration"] + self.offset == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(Recorder, "on_train_loss_report", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        run(base(tiny, tmp_path / "cut", dropout=0.0))
    monkeypatch.undo()
    folder = tmp_path / "cut"
    shapes = {k: v.shape for k, v in mx.load(str(folder / "0000005_adapters.safetensors")).items()}
    arrays, meta = mx.load(str(folder / STATE_FILE), return_metadata=True)
    old = {}
    for key, value in arrays.items():
        path, found, leaf = key.partition(".smoa_factors.")
        if not found:
            old[key] = value
            continue
        blocks = sorted((k for k in shapes if k.startswith(path + ".smoa_")), key=lambda k: (k.split(".")[-2],
                                                                                             int(k.split(".")[-1])))
        start = 0
        for k in blocks:  # smoa_a.0, smoa_a.1, .., smoa_b.0, ..: the packed order
            n = math.prod(shapes[k])
            old[f"{k}.{leaf}"] = mx.reshape(value[start : start + n], shapes[k])
            start += n
        assert start == value.size
    assert any(".smoa_a.1.m" in k for k in old) and not any("smoa_factors" in k for k in old)
    mx.save_safetensors(str(folder / STATE_FILE), old, metadata=meta)

    resumed = run(base(tiny, folder, dropout=0.0, resume=True))
    assert resumed["start_step"] == 5
    a, b = weights(tmp_path / "full"), weights(folder)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_refuses_other_settings(tiny, tmp_path):
    run(base(tiny, tmp_path, iters=2, save_every=2))
    with pytest.raises(ValueError, match="rank: saved 8, asked 4"):
        run(base(tiny, tmp_path, iters=4, rank=4, resume=True))


def test_nan_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    # learning rate 1e-3 for three updates, then 1e57 (inf in float32): the weights blow up at update 4
    schedule = {"name": "step_decay", "arguments": [1e-3, 1e60, 3]}
    with pytest.raises(TrainingDiverged, match="step 2"):
        run(base(tiny, tmp_path, lr_schedule=schedule, save_every=2, dropout=0.0))
    state, _ = load_state(tmp_path)
    assert state.step == 2
    final, ckpt = weights(tmp_path), weights(tmp_path, "0000002_adapters.safetensors")
    for k in final:
        assert np.isfinite(final[k]).all()
        np.testing.assert_array_equal(final[k], ckpt[k])


@pytest.mark.parametrize("kind", ["lora", "hira"])
def test_baselines_share_the_loop(tiny, tmp_path, kind):
    result = run(base(tiny, tmp_path, fine_tune_type=kind, iters=4, rank=4, test=False))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind
    if kind == "lora":
        from mlx_lm import load

        load(tiny["model"], adapter_path=str(tmp_path))  # stock mlx-lm reads it back
        assert any(k.endswith("lora_a") for k in weights(tmp_path))
    else:
        assert config["smoa_parameters"]["blocks"] == 1
    assert len(result["train_losses"]) == 4
    # --test alone evaluates the saved adapter, which differs from the base (a zero-learning-rate adapter)
    tested = run(base(tiny, tmp_path, data=tiny["data"], train=False, test=True, test_batches=-1))
    assert tested["test_loss"] is not None and math.isfinite(tested["test_loss"])
    assert tested["test_loss"] != pytest.approx(run(base(tiny, tmp_path / "untrained", fine_tune_type=kind,
                                                            iters=1, warmup=0, learning_rate=0.0, rank=4, train=True, test=True,
                                                            test_batches=-1))["test_loss"], abs=1e-4)


def test_defaults_per_method():
    smoa, lora = parse_args([]), parse_args(["--fine-tune-type", "lora"])
    assert smoa.model is None and smoa.data is None and smoa.train
    assert smoa.blocks == 2 and smoa.rank == 8 and smoa.alpha is None and smoa.dropout == 0.0
    assert smoa.learning_rate >= 5 * lora.learning_rate  # Hadamard adapters need a far larger step
    assert parse_args(["--fine-tune-type", "hira"]).blocks == 1
    assert parse_args(["--target-modules", "q_proj,v_proj"]).target_modules == ["q_proj", "v_proj"]


def test_unknown_flag_and_config_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--itres", "3"])
    assert e.value.code == 2 and "--itres" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("iters: 5\nlearning_rat: 1e-3\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown config keys \['learning_rat'\]"):
        parse_args(["-c", str(cfg)])
    cfg.write_text("iters: 5\nlearning_rate: 1e-3\nlora_parameters: {rank: 4, scale: 2.0}\n")
    opts = parse_args(["-c", str(cfg), "--iters", "7"])
    assert (opts.iters, opts.learning_rate, opts.rank, opts.alpha) == (7, 1e-3, 4, 8.0)
    assert train_mod.main(["--model", str(tmp_path / "nope"), "--iters", "0"]) == 2


def test_malformed_and_empty_jsonl(tiny, tmp_path):
    from mlx_lm import load

    _, tokenizer = load(tiny["model"])
    bad = tmp_path / "bad"
    write_jsonl(bad / "train.jsonl", [{"text": "the cat"}] * 4)
    with open(bad / "train.jsonl", "a") as f:
        f.write('{"text": "a dog",}\n')
    with pytest.raises(DataError, match=r"bad/train.jsonl, line 5: not valid JSON"):
        load_splits(str(bad), tokenizer, 64, 2)
    write_jsonl(bad / "train.jsonl", [{"text": "the cat"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"train.jsonl, line 2: missing key 'text'"):
        load_splits(str(bad), tokenizer, 64, 1)
    (bad / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="train.jsonl: the file holds no examples"):
        load_splits(str(bad), tokenizer, 64, 1)
    (tmp_path / "only_valid").mkdir()
    write_jsonl(tmp_path / "only_valid" / "valid.jsonl", [{"text": "the cat"}])
    with pytest.raises(DataError, match="no train.jsonl"):
        load_splits(str(tmp_path / "only_valid"), tokenizer, 64, 1)
    write_jsonl(bad / "train.jsonl", [{"text": "the cat"}] * 3)
    with pytest.raises(DataError, match="3 examples, fewer than --batch-size 4"):
        load_splits(str(bad), tokenizer, 64, 4)


def test_bad_data_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    """A typo in a data file must not cost a model load (minutes for a large model) before the error."""
    bad = tmp_path / "bad"
    write_jsonl(bad / "train.jsonl", [{"text": "the cat"}, {"prompt": "a"}])
    loaded = []
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(
        AssertionError("the model was loaded before the data was checked")))
    with pytest.raises(DataError, match=r"train.jsonl, line 2: missing key 'text'"):
        train_mod.run({"data": str(bad), "adapter_path": str(tmp_path / "ad"), "iters": 1})
    assert loaded == []
    assert train_mod.main(["--data", str(bad), "--adapter-path", str(tmp_path / "ad2"), "--iters", "1"]) == 2
    assert loaded == []


def test_long_sequences_warn_and_truncate(tiny, tmp_path):
    from mlx_lm import load

    _, tokenizer = load(tiny["model"])
    folder = tmp_path / "long"
    write_jsonl(folder / "train.jsonl", [{"text": " ".join(["the"] * n)} for n in (3, 4, 30, 40)])
    warnings = []
    splits = load_splits(str(folder), tokenizer, 16, 2, warn=warnings.append)
    assert max(len(t) for t, _ in splits["train"].items) == 16
    assert any("2 of 4 examples are longer than --max-seq-length 16" in w for w in warnings)
    assert any("no valid.jsonl" in w for w in warnings)


def test_packaged_demo_data(tiny):
    for split in ("train", "valid", "test"):
        rows = read_jsonl(PACKAGED_DATA / f"{split}.jsonl")
        assert len(rows) >= 40 and all(set(r) == {"prompt", "completion", "_line"} for r in rows)
    train = {r["prompt"] for r in read_jsonl(PACKAGED_DATA / "train.jsonl")}
    valid = {r["prompt"] for r in read_jsonl(PACKAGED_DATA / "valid.jsonl")}
    assert not train & valid  # validation measures unseen questions


def test_nccl_workaround_reroutes_cpu_all_sums(tiny, monkeypatch):
    """Under NCCL the trainer's all_sum(..., stream=mx.cpu) must go to the default (GPU) stream."""
    from mlx_lm.tuner import trainer

    from smoa_mlx.train.loop import patched_trainer

    seen = []
    real = mx.distributed.all_sum

    def spy(x, *a, stream=None, **kw):
        seen.append(stream)
        return real(x, *a, stream=stream, **kw)

    monkeypatch.setattr(mx.distributed, "all_sum", spy)
    with patched_trainer(0, nccl=True):
        trainer.mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu)
    with patched_trainer(0, nccl=False):
        trainer.mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu)
    assert seen == [None, mx.cpu]
    assert trainer.mx is mx


def test_transformers5_rope_parameters_reach_mlx_lm(tmp_path):
    """A config.json with rope_theta only inside rope_parameters (as transformers 5 writes it) must not load with
    mlx-lm's default base: the model would run with the wrong positions and no error."""
    import json

    from smoa_mlx.loading import load_model

    folder = build_model_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"rope_parameters.*\['rope_theta'\]"):
        model, _ = load_model(str(folder))
    assert model.args.rope_theta == 500000.0
    assert model.model.layers[0].self_attn.rope.base == 500000.0
    # Llama 3 scaling lives there too.
    config["rope_parameters"].update(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"\['rope_scaling', 'rope_theta'\]"):
        model, _ = load_model(str(folder))
    assert type(model.model.layers[0].self_attn.rope).__name__ == "Llama3RoPE"
    # Old-style configs load untouched.
    config["rope_theta"], config["rope_scaling"] = 20000.0, None
    del config["rope_parameters"]
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(str(folder))
    assert model.args.rope_theta == 20000.0


def test_grad_checkpoint_trains_the_same(tiny, tmp_path):
    """--grad-checkpoint (mlx-lm's, which recomputes each block in the backward) through SMoA's custom vjp."""
    from mlx_lm.models import llama

    plain = run(base(tiny, tmp_path / "plain", iters=3, dropout=0.0, test=False))
    original = llama.TransformerBlock.__call__  # mlx-lm patches the class itself: undo it for the other tests
    try:
        checkpointed = run(base(tiny, tmp_path / "ckpt", iters=3, dropout=0.0, test=False, grad_checkpoint=True))
        assert llama.TransformerBlock.__call__ is not original  # the option did reach mlx-lm
    finally:
        llama.TransformerBlock.__call__ = original
    np.testing.assert_allclose([l for _, l in checkpointed["train_losses"]], [l for _, l in plain["train_losses"]],
                               rtol=1e-4)
    for k, v in weights(tmp_path / "plain").items():
        np.testing.assert_allclose(weights(tmp_path / "ckpt")[k], v, rtol=1e-3, atol=1e-6)
