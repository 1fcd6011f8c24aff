"""#14 item 11: bad training data is refused with one line naming the file, line and key, before the model loads."""

import random

import pytest
from train_helpers import build_data_folder, write_jsonl

from faults.trials import DATA_FORMS, bad_data, _data_folder
from smoa_mlx.train.data import DataError, check_data, load_splits


@pytest.mark.parametrize("form", sorted(DATA_FORMS))
def test_bad_record_is_named(world, form):
    records, key, _ = DATA_FORMS[form]
    kind = "chat" if "messages" in records[0] else "completions" if "prompt" in records[0] else "text"
    folder = _data_folder(world, kind, records)
    with pytest.raises(DataError) as e:
        check_data(str(folder))  # what train runs before loading the model
    message = str(e.value)
    assert "train.jsonl, line 3" in message and key in message, message
    assert "\n" not in message


def test_tool_calls_may_have_null_content(world, tmp_path):
    folder = build_data_folder(tmp_path / "d", kind="chat")
    rows = [{"messages": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                          {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}]}] * 4
    write_jsonl(folder / "train.jsonl", rows)
    assert check_data(str(folder))["train"][0][0]["messages"][1]["content"] is None


def test_not_utf8_names_the_line(tmp_path):
    folder = build_data_folder(tmp_path / "d", kind="text")
    lines = (folder / "train.jsonl").read_bytes().split(b"\n")
    lines[4] = b'{"text": "caf\xe9"}'
    (folder / "train.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"train.jsonl, line 5: not UTF-8"):
        check_data(str(folder))


def test_prompt_filling_the_window_is_left_out(world, tmp_path):
    from mlx_lm import load

    _, tokenizer = load(world.model)
    folder = tmp_path / "d"
    long = {"prompt": " ".join(["the"] * 30), "completion": "cat"}
    write_jsonl(folder / "train.jsonl", [{"prompt": "a", "completion": "the cat"}] * 3 + [long])
    warnings = []
    splits = load_splits(str(folder), tokenizer, 16, 2, mask_prompt=True, warn=warnings.append)
    assert len(splits["train"]) == 3
    assert any("1 of 4 examples have no completion token within --max-seq-length 16 (first: " in w
               and "line 4" in w for w in warnings), warnings
    write_jsonl(folder / "train.jsonl", [long] * 3)
    with pytest.raises(DataError, match="3 of 3 examples have no completion token"):
        load_splits(str(folder), tokenizer, 16, 2, mask_prompt=True, warn=warnings.append)


@pytest.mark.parametrize("form", ["max-seq-length 1", "null content"])
def test_cli_refuses_before_loading_the_model(world, form):
    outcome = bad_data(world, random.Random(0), form=form)
    assert not outcome.failures, outcome.failures
