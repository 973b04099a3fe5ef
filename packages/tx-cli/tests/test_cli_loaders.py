"""Loaders, dataset opening and batching of `tx train` (no training here).

The masking checks decode the weighted *targets* back to text: for chat that text must be
exactly the assistant turns plus their end-of-turn token, whatever the family's template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from tx_cli.loaders import LOADERS, Example, TrainInputError, resolve_loader
from tx_cli.loaders.chat import load_chat
from tx_cli.loaders.text import load_text
from tx_cli.train_data import batch_for_step, batch_indices, bucket_length, collate, open_dataset
from tx_engine.testing import build_model

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-llama3"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_model(request.param, tmp_path_factory.mktemp(request.param))
    return AutoTokenizer.from_pretrained(str(path))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    return open_dataset(str(_write_jsonl(tmp_path / "d.jsonl", rows)), "train")


def test_text_loader_shifts_by_one_and_appends_eos(tokenizer: Any, tmp_path: Path) -> None:
    data = _dataset(tmp_path, [{"text": "hello world"}, {"text": "a b c d e f g"}])
    examples = load_text(data, tokenizer, max_length=64)
    assert len(examples) == 2
    for ex, text in zip(examples, ["hello world", "a b c d e f g"], strict=True):
        full = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
        np.testing.assert_array_equal(ex.input_tokens, full[:-1])
        np.testing.assert_array_equal(ex.target_tokens, full[1:])
        np.testing.assert_array_equal(ex.weights, np.ones(len(full) - 1, np.float32))
        assert ex.input_tokens.dtype == np.int32
        assert ex.weights.dtype == np.float32


def test_text_loader_truncates_to_max_length(tokenizer: Any, tmp_path: Path) -> None:
    data = _dataset(tmp_path, [{"text": "one two three four five six seven eight nine ten"}])
    (ex,) = load_text(data, tokenizer, max_length=5)
    assert len(ex) == 5


def test_chat_loader_weights_only_assistant_turns(tokenizer: Any, tmp_path: Path) -> None:
    data = _dataset(tmp_path, [{"messages": CHAT}])
    (ex,) = load_chat(data, tokenizer, max_length=512)
    weighted = ex.target_tokens[ex.weights > 0]
    unweighted = ex.target_tokens[ex.weights == 0]
    decoded = tokenizer.decode(weighted.tolist())
    eos = tokenizer.eos_token
    # Qwen3 renders an empty think block in front of the final answer; it is assistant output.
    assert decoded.replace("<think>\n\n</think>\n\n", "") == f"Four.{eos}Six, of course.{eos}"
    prompt_text = tokenizer.decode(unweighted.tolist())
    for m in CHAT:
        if m["role"] != "assistant":
            assert m["content"] in prompt_text
    assert "Four." not in prompt_text
    assert "Six" not in prompt_text


def test_chat_loader_rejects_malformed_messages(tokenizer: Any, tmp_path: Path) -> None:
    data = _dataset(tmp_path, [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(TrainInputError, match="row 0: each message needs"):
        load_chat(data, tokenizer, max_length=64)


@pytest.mark.parametrize("loader", [load_text, load_chat])
def test_loaders_name_the_missing_column(loader: Any, tokenizer: Any, tmp_path: Path) -> None:
    data = _dataset(tmp_path, [{"prompt": "x"}])
    with pytest.raises(TrainInputError, match=r"dataset has no column '\w+' \(columns: prompt\)"):
        loader(data, tokenizer, 64)


def test_collate_pads_with_zero_weight_and_mask() -> None:
    def ex(n: int) -> Example:
        toks = np.arange(1, n + 2, dtype=np.int32)
        return Example(toks[:-1], toks[1:], np.full(n, 0.5, np.float32))

    batch = collate([ex(3), ex(40)])
    weights = batch["inputs"]["weights"]
    assert batch["input_ids"].shape == (2, 64) == weights.shape
    # normalised by the batch's total weight (43 · 0.5), so the summed loss is the mean
    np.testing.assert_allclose(weights[0, :3], 0.5 / 21.5)
    assert weights.sum() == pytest.approx(1.0)
    assert not weights[0, 3:].any()
    assert not batch["loss_mask"][0, 3:].any()
    assert not batch["attention_mask"][0, 3:].any()
    assert batch["attention_mask"][1, :40].all()
    assert not batch["attention_mask"][1, 40:].any()
    np.testing.assert_array_equal(batch["positions"][1], np.arange(64))
    assert [bucket_length(n) for n in (1, 32, 33, 100)] == [32, 32, 64, 128]


def test_batch_order_is_a_function_of_the_step() -> None:
    n, b = 7, 3
    seen = [i for step in range(7) for i in batch_indices(n, b, step, seed=0)]
    for epoch in range(3):  # 21 positions = 3 full epochs, each a permutation
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert batch_indices(n, b, 5, seed=0) == batch_indices(n, b, 5, seed=0)
    assert seen != list(range(n)) * 3
    examples = [
        Example(*(np.array([i, i + 1], np.int32),) * 2, np.ones(2, np.float32)) for i in range(n)
    ]
    first = batch_for_step(examples, b, 2)["input_ids"][:, 0].tolist()
    assert first == batch_indices(n, b, 2, seed=0)


def test_resolve_loader_by_name_and_by_import_path() -> None:
    assert resolve_loader("tx.loaders.text") is load_text
    assert resolve_loader("tx.loaders.chat") is load_chat
    assert set(LOADERS) == {"tx.loaders.text", "tx.loaders.chat"}
    assert resolve_loader("tx_cli.loaders.chat.load_chat") is load_chat
    for bad in ("tx.loaders.nope", "nope", "tx_cli.loaders.text.missing_fn"):
        with pytest.raises(TrainInputError, match="unknown loader"):
            resolve_loader(bad)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "arrow", "saved"])
def test_open_dataset_local_formats(fmt: str, tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"]})
    path = tmp_path / f"d.{fmt}"
    if fmt in ("jsonl", "json"):
        ds.to_json(str(path), lines=fmt == "jsonl")
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "arrow":
        path = tmp_path / "arrow_dir"
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    else:
        ds.save_to_disk(str(path))
    assert open_dataset(str(path), "train")["text"] == ["a", "b", "c"]


def test_open_dataset_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TrainInputError, match=r"dataset file not found: .*nope\.jsonl"):
        open_dataset(str(tmp_path / "nope.jsonl"), "train")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(TrainInputError, match=r"unknown split 'test' .* available: train"):
        open_dataset(str(path), "test")
