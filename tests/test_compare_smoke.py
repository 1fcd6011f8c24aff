"""scripts/compare.py end to end at smoke scale (tiny llama, a few steps), and the parts its numbers rest on:
the deterministic BIG-bench split, option scoring, the spectral-order cache and the GGUF path override."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from smoa_mlx.eval import bigbench
from smoa_mlx.eval.choice_eval import encode, score_choices
from smoa_mlx.spectral import cached_orders, spectral_order

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _bigbench_or_skip() -> Path:
    try:
        return bigbench.data_root()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _compare_module():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("compare_script", SCRIPTS / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from train_helpers import build_model_folder

    from smoa_mlx.loading import load_model

    folder = build_model_folder(tmp_path_factory.mktemp("tiny") / "model", layers=2, hidden=64)
    model, tokenizer = load_model(str(folder))
    return folder, model, tokenizer


def test_split_is_deterministic_grouped_and_proportional():
    root = _bigbench_or_skip()
    for name in bigbench.TASKS:
        examples = bigbench.load_task(name, root)
        splits = bigbench.split_task(name, examples)
        again = bigbench.split_task(name, list(reversed(examples)))  # file order must not matter
        assert {s: [e.prompt for e in v] for s, v in splits.items()} == {s: [e.prompt for e in v] for s, v in again.items()}
        assert sum(len(v) for v in splits.values()) == len(examples)
        groups = {s: {e.group for e in v} for s, v in splits.items()}
        assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["valid"])
        assert not (groups["valid"] & groups["test"])
        share = len(splits["test"]) / len(examples)
        assert 0.15 < share < 0.25, (name, share)
        for ex in examples[:50]:
            assert 0 <= ex.answer < len(ex.options)
            assert name != "social_iqa" or all(o in ex.prompt for o in ex.options)  # choices appended, as BIG-bench does
    capped = bigbench.task_splits("winowhy", root, {"test": 7})
    assert [e.prompt for e in capped["test"]] == [e.prompt for e in splits["test"][:7]]
    ref = bigbench.reference_accuracies(capped["train"], splits["test"])
    assert ref["chance"] == 0.5 and 0.5 < ref["majority"] < 0.6  # WinoWhy: 'incorrect' is the majority answer


def test_bad_task_files_fail_with_their_name(tmp_path):
    (tmp_path / "winowhy.json").write_text(json.dumps({"examples": [{"input": "x", "target_scores": {"a": 1}}]}))
    with pytest.raises(ValueError, match="winowhy.json"):
        bigbench.load_task("winowhy", tmp_path)
    with pytest.raises(ValueError, match="unknown BIG-bench task"):
        bigbench.load_task("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="social_iqa.json"):
        bigbench.load_task("social_iqa", tmp_path)


def test_option_scores_equal_one_sequence_at_a_time(tiny):
    _, model, tokenizer = tiny
    examples = [
        bigbench.Example("the cat sat on the mat", ("red", "blue green", "one two three"), 1, "g1"),
        bigbench.Example("what is the color of sky", ("yes", "no"), 0, "g2"),
    ]
    batched = score_choices(model, tokenizer, examples, max_tokens=10_000)
    single = score_choices(model, tokenizer, examples, max_tokens=1)  # one sequence per forward
    np.testing.assert_allclose(np.concatenate(batched.sums), np.concatenate(single.sums), rtol=1e-4, atol=1e-4)
    for ex, sums, counts in zip(examples, batched.sums, batched.counts):
        for option, got, n in zip(ex.options, sums, counts):
            tokens, offset = encode(tokenizer, ex.prompt, option)
            logits = model(mx.array(tokens[:-1])[None])[0].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            want = sum(logp[t - 1, tokens[t]].item() for t in range(offset, len(tokens)))
            assert n == len(tokens) - offset
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    means = [[s / c for s, c in zip(ss, cc)] for ss, cc in zip(batched.sums, batched.counts)]
    assert batched.predictions("mean") == [int(np.argmax(m)) for m in means]
    assert batched.predictions("sum") == [int(np.argmax(s)) for s in batched.sums]


def test_cached_orders_equal_fresh_ones_and_are_off_by_default():
    w = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    fresh = spectral_order(w)
    with cached_orders():
        first = spectral_order(w)
        first[0][:] = 0  # a caller mutating its copy must not reach the cache
        second = spectral_order(mx.array(w))
        other = spectral_order(w + 1.0)
    for got, want in zip(second, fresh):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(other[1], fresh[1]) or not np.array_equal(other[0], fresh[0])
    from smoa_mlx import spectral

    assert spectral._order_cache is None


def test_gguf_path_override(monkeypatch, tmp_path):
    from smoa_mlx.models.embedded import GGUF_ENV, embedded_gguf_path

    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=GGUF_ENV):
        embedded_gguf_path()
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setenv(GGUF_ENV, str(file))
    assert embedded_gguf_path() == file


def test_compare_smoke_runs_resumes_and_reports(tiny, tmp_path):
    _bigbench_or_skip()
    compare = _compare_module()
    folder = tiny[0]
    out, doc = tmp_path / "quality.json", tmp_path / "docs" / "QUALITY.md"
    argv = ["--out", str(out), "--doc", str(doc), "--model", str(folder), "--tasks", "winowhy",
            "--methods", "lora,smoa-k2-half", "--seeds", "0", "--lrs", "1e-3,3e-3", "--iters", "2",
            "--batch-size", "2", "--max-train", "8", "--max-valid", "4", "--max-test", "6", "--label", "smoke"]
    assert compare.main(argv) == 0
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert {(r["variant"], r["lr"]) for r in runs} == {(v, lr) for v in ("lora", "smoa-k2-half") for lr in (1e-3, 3e-3)}
    tested = [r for r in runs if r.get("test_accuracy") is not None]
    assert sorted(r["variant"] for r in tested) == ["lora", "smoa-k2-half"]  # test only at the chosen rate
    for r in runs:
        assert 0.0 <= r["valid_accuracy"] <= 1.0 and r["sequence_tokens"] > 0 and r["tokens_per_second"] > 0
        assert (Path(str(out.with_name("quality-work"))) / "adapters").is_dir()
    params = {r["variant"]: r["trainable_parameters"] for r in runs}
    assert params["smoa-k2-half"] * 2 == params["lora"]  # SMoA K=2 at LoRA's rank: half the parameters
    assert data["zero_shot"][0]["task"] == "winowhy" and 0 <= data["zero_shot"][0]["test_accuracy"] <= 1
    text = doc.read_text()
    assert "smoke" in text and "| LoRA r=8" in text and "SMoA K=2 r=8, 0.50x LoRA params" in text
    assert (doc.parent / "QUALITY.png").stat().st_size > 1000

    assert compare.main(argv) == 0  # resumed: nothing new to run
    again = json.loads(out.read_text())
    assert len(again["runs"]) == len(runs) and len(again["invocations"]) == 2

    other = argv[:argv.index("--iters")] + ["--iters", "3"] + argv[argv.index("--iters") + 2:]
    assert compare.main(other) == 2  # another protocol into the same file is refused

    fresh = tmp_path / "budget.json"
    stopped = argv[:1] + [str(fresh)] + argv[2:] + ["--budget-seconds", "1e-6"]
    assert compare.main(stopped) == 0
    made = json.loads(fresh.read_text())
    assert made["runs"] == [] and made["invocations"][0]["stopped"].startswith("budget")


def test_report_selects_on_valid_and_judges_against_noise(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import quality_report as qr

    def run(task, variant, method, lr, seed, valid, test=None, params=100):
        key = "accuracy" if task == "qa" else "loss"
        out = {"task": task, "variant": variant, "method": method, "rank": 8, "blocks": 2, "lr": lr, "seed": seed,
               "trainable_parameters": params, "tokens_per_second": 10.0, "peak_memory_gb": 1.0,
               "final_val_loss": 1.0, f"valid_{key}": valid}
        if test is not None:
            out[f"test_{key}"] = test
        return out

    runs = [run("qa", "lora", "lora", 1e-3, 0, 0.50), run("qa", "lora", "lora", 1e-2, 0, 0.60, 0.70)]
    runs += [run("qa", "lora", "lora", 1e-2, s, 0.6, 0.70 + 0.01 * s) for s in (1, 2)]
    # SMoA's best *test* number sits at the rate validation did not pick: it must not be reported.
    runs += [run("qa", "smoa-k2-half", "smoa", 1e-3, 0, 0.55, 0.99, 50), run("qa", "smoa-k2-half", "smoa", 1e-2, 0, 0.65, 0.60, 50)]
    runs += [run("qa", "smoa-k2-half", "smoa", 1e-2, s, 0.6, 0.60 + 0.01 * s, 50) for s in (1, 2)]
    runs += [run("lm", "lora", "lora", 1e-3, s, 2.0, 2.0 + 0.01 * s) for s in (0, 1, 2)]
    runs += [run("lm", "smoa-k2", "smoa", 1e-3, s, 1.9, 1.5 + 0.01 * s) for s in (0, 1, 2)]
    data = {"settings": {"lrs": [1e-3, 1e-2], "selection_seed": 0, "scoring": "mean", "iters": 1, "batch_size": 1,
                         "warmup": 0, "dropout": 0.0, "rank": 8, "max_train": 0, "max_valid": 0, "max_test": 0},
            "model": "m", "invocations": [], "zero_shot": [{"task": "qa", "test_accuracy": 0.4}], "runs": runs,
            "tasks": {"qa": {"metric": "accuracy", "sizes": {}, "reference": {"chance": 1 / 3}, "data": "x"},
                      "lm": {"metric": "loss", "sizes": {}, "reference": {}, "data": "y"}}}
    assert qr.select_lr(data, "qa", "smoa-k2-half", [1e-3, 1e-2]) == 1e-2
    rows = {r["variant"]: r for r in qr.summarize(data, "qa")}
    assert rows["smoa-k2-half"]["values"] == pytest.approx([0.60, 0.61, 0.62])
    said = qr.verdicts(list(rows.values()), "accuracy")
    assert len(said) == 1 and "**SMoA loses**" in said[0] and "0.50x LoRA params" in said[0]
    lm = qr.verdicts(qr.summarize(data, "lm"), "loss")  # lower loss is better
    assert len(lm) == 1 and "**SMoA wins**" in lm[0]
    doc = qr.write_report(data, tmp_path / "Q.md")
    text = doc.read_text()
    assert "61.0 ± 1.0" in text and "99.0" not in text and "1.5100 ± 0.0100" in text
    assert (tmp_path / "Q.png").stat().st_size > 1000


def test_a_diverging_rate_is_recorded_and_never_chosen(tiny, tmp_path):
    _bigbench_or_skip()
    compare = _compare_module()
    out = tmp_path / "q.json"
    argv = ["--out", str(out), "--model", str(tiny[0]), "--tasks", "winowhy", "--methods", "lora", "--seeds", "0",
            "--lrs", "1e-3,1e30", "--iters", "3", "--batch-size", "2", "--max-train", "8", "--max-valid", "4",
            "--max-test", "4"]
    assert compare.main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    bad = [r for r in runs if r["lr"] == 1e30]
    assert len(bad) == 1 and "diverged" in bad[0] and "test_accuracy" not in bad[0]
    assert [r["lr"] for r in runs if r.get("test_accuracy") is not None] == [1e-3]


def test_report_merges_shards_and_refuses_disagreements(tmp_path):
    """Shards of one grid (one per GPU) merge into one report; other protocols and clashing runs are refused."""
    sys.path.insert(0, str(SCRIPTS))
    import quality_report as qr

    settings = {"lrs": [1e-3], "selection_seed": 0, "scoring": "mean", "iters": 1, "batch_size": 1, "warmup": 0,
                "dropout": 0.0, "rank": 8, "max_train": 0, "max_valid": 0, "max_test": 0}
    run = {"task": "qa", "variant": "lora", "method": "lora", "lr": 1e-3, "seed": 0, "valid_accuracy": 0.5,
           "rank": 8, "blocks": None, "trainable_parameters": 100, "tokens_per_second": 10.0, "peak_memory_gb": 1.0}

    def shard(name, runs, zero, **over):
        made = {"label": name, "started": "t", "device": "cpu", "mlx": "0", "platform": "p", "command": "c"}
        data = {"format": "f", "model": "m", "settings": dict(settings, **over), "invocations": [made],
                "tasks": {"qa": {"metric": "accuracy", "sizes": {}, "reference": {}, "data": "x"}}, "zero_shot": zero,
                "runs": runs}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        return path

    zero = [{"task": "qa", "test_accuracy": 0.4}]
    a = shard("a", [run], zero)
    # The same selection run, later scored on test too (a superset), plus a run only this shard made.
    b = shard("b", [dict(run, test_accuracy=0.6), dict(run, seed=1, test_accuracy=0.7)], zero)
    merged = qr.merge_results([(p, json.loads(p.read_text())) for p in (a, b)])
    assert sorted((r["seed"], r.get("test_accuracy")) for r in merged["runs"]) == [(0, 0.6), (1, 0.7)]
    assert len(merged["zero_shot"]) == 1 and [i["label"] for i in merged["invocations"]] == ["a", "b"]
    out = tmp_path / "merged.json"
    assert qr.main([str(a), str(b), "--doc", str(tmp_path / "Q.md"), "--merged", str(out)]) == 0
    assert len(json.loads(out.read_text())["runs"]) == 2

    clash = shard("c", [dict(run, valid_accuracy=0.9)], zero)
    with pytest.raises(ValueError, match=r"c.json: runs record \('qa', 'lora', 0.001, 0\) differs"):
        qr.merge_results([(p, json.loads(p.read_text())) for p in (a, clash)])
    other = shard("d", [], zero, rank=16)
    with pytest.raises(ValueError, match="d.json: settings differs"):
        qr.merge_results([(p, json.loads(p.read_text())) for p in (a, other)])
    assert qr.main([str(a), str(other), "--doc", str(tmp_path / "Q2.md")]) == 2
