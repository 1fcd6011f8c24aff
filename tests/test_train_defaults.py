"""What ``python -m smoa_mlx.train`` does with no flags: the backend's defaults (a run that finishes in minutes on a
CPU), the held-out answer before and after, and the spectral orders read back from the cache by the next run."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from train_helpers import build_data_folder, build_model_folder

from smoa_mlx.train import run
from smoa_mlx.train.args import CPU_DEFAULTS, DEFAULTS, backend, parse_args, resolve, schedule_note
from smoa_mlx.train.data import check_data
from smoa_mlx.train.preview import answer, held_out_question


def test_cpu_backend_runs_the_short_schedule():
    cpu, gpu = resolve({}, on="cpu"), resolve({}, on="gpu")
    assert (cpu.iters, cpu.steps_per_eval, cpu.val_batches, cpu.steps_per_report) == (20, 10, 2, 5)
    assert (gpu.iters, gpu.steps_per_eval, gpu.val_batches, gpu.steps_per_report) == (200, 50, 25, 10)
    assert cpu.warmup == 2 and gpu.warmup == 20  # min(100, iters // 10) follows the backend's iters
    for key in vars(cpu):  # the schedule is all that differs
        if key not in CPU_DEFAULTS and key != "warmup":
            assert getattr(cpu, key) == getattr(gpu, key), key
    given = resolve({"iters": 200}, on="cpu")  # a flag wins over the backend's default
    assert given.iters == 200 and given.warmup == 20 and given.val_batches == CPU_DEFAULTS["val_batches"]
    assert "CPU defaults" in schedule_note(cpu, on="cpu") and "--iters 200" in schedule_note(cpu, on="cpu")
    assert "CPU defaults" not in schedule_note(given, on="cpu")
    assert "CPU defaults" not in schedule_note(gpu, on="gpu") and "200 steps" in schedule_note(gpu, on="gpu")


def test_no_flags_on_this_machine_use_its_backend():
    opts = parse_args([])
    expected = {**DEFAULTS, **(CPU_DEFAULTS if backend() == "cpu" else {})}
    assert backend() == ("cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu")
    assert {k: getattr(opts, k) for k in CPU_DEFAULTS} == {k: expected[k] for k in CPU_DEFAULTS}
    assert opts.preview and parse_args(["--no-preview"]).preview is False


def test_held_out_question_of_each_format(tmp_path):
    packaged = held_out_question(check_data(None))
    assert packaged == [{"role": "user", "content": "What is 55 minus 26?"}]  # smoa_mlx/data/test.jsonl, line 1
    chat = held_out_question(check_data(str(build_data_folder(tmp_path / "chat", kind="chat"))))
    assert [m["role"] for m in chat] == ["user"]
    assert held_out_question(check_data(str(build_data_folder(tmp_path / "text", kind="text")))) is None
    assert held_out_question(None) is None  # hub data: nothing read up front


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": str(build_model_folder(root / "model")), "data": str(build_data_folder(root / "data"))}


def _options(tiny, path, **kw):
    return dict(model=tiny["model"], data=tiny["data"], adapter_path=str(path), iters=2, batch_size=4,
                steps_per_eval=2, val_batches=1, learning_rate=5e-2, warmup=0, seed=1, **kw)


def test_run_answers_before_and_after_and_the_next_run_reads_the_orders_back(tiny, tmp_path, monkeypatch):
    from smoa_mlx import spectral

    monkeypatch.setenv(spectral.CACHE_ENV, str(tmp_path / "cache"))
    first = run(_options(tiny, tmp_path / "a"))
    preview = first["preview"]
    assert preview["question"] and isinstance(preview["before"], str) and isinstance(preview["after"], str)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) > 0

    def recompute(*_):
        raise AssertionError("the spectral orders were recomputed instead of read from the cache")

    monkeypatch.setattr(spectral, "spectral_scores", recompute)
    second = run(_options(tiny, tmp_path / "b", preview=False))
    assert "preview" not in second
    np.testing.assert_allclose(second["val_losses"][0][1], first["val_losses"][0][1], rtol=1e-5)


def test_answer_leaves_the_adapter_in_place(tiny):
    from mlx_lm import load

    from smoa_mlx import SMoAConfig, apply_smoa, smoa_layers

    model, tokenizer = load(tiny["model"])
    apply_smoa(model, SMoAConfig(rank=4, blocks=2, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for layer in smoa_layers(model).values():  # a non-zero update, so a reply without it would show
        layer.smoa_b = [mx.random.normal(b.shape) * 0.5 for b in layer.smoa_b]
    tokens = mx.array([tokenizer.encode("the cat sat on the mat")])
    model.train()
    live = model(tokens)
    reply = answer(model, tokenizer, [{"role": "user", "content": "what is the color of sky"}], max_tokens=6)
    assert isinstance(reply, str) and "\n" not in reply
    assert len(smoa_layers(model)) == 4 and not model.training
    model.train()
    np.testing.assert_allclose(np.array(model(tokens)), np.array(live), rtol=1e-5, atol=1e-5)


def test_default_training_runs_the_merged_form(tiny, tmp_path, monkeypatch):
    """The CLI's defaults train every SMoA layer through the merged form (W0 + Delta W in one matmul): dropout on the
    update path would run it apart from the base, 15% slower on the CPU (docs/BENCHMARKS.md); the reference runs'
    dropout 0.05 was once the default and took every default run off the fast path unnoticed."""
    from smoa_mlx import layer, spectral

    monkeypatch.setenv(spectral.CACHE_ENV, str(tmp_path / "cache"))

    def apart(*_):
        raise AssertionError("a default training step ran the update apart from the base (dropout > 0)")

    monkeypatch.setattr(layer, "delta_fn", apart)
    result = run(_options(tiny, tmp_path / "a", preview=False))
    assert result["train_losses"] and parse_args([]).dropout == 0.0
