"""`tx train`'s two extras on the tiny Qwen3: LoRA (``--lora-rank``) and W&B tracking, offline.

One real LoRA run (4 steps, checkpoints every 2) reports to W&B in offline mode and is shared by
the module: its loss must fall, its checkpoints must hold the engine's adapter state and a PEFT
export, a resume from step 2 must reproduce steps 3-4 exactly, and the offline ``.wandb`` run
file must hold the loss history of ``metrics.jsonl``. No network is used: W&B runs with
``mode: offline`` and ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from tx_cli.main import app

OPT = '{"learning_rate": 2e-2, "weight_decay": 0.0}'
RANK = 4
runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": f"the cat sat on mat number {i} and the dog sat too"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(*args: str, wandb_dir: Path | None = None) -> Any:
    env = {"COLUMNS": "200", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["TX_COMPILATION_CACHE_DIR"] = ""  # in process: the cache would be process-global
    if wandb_dir is not None:
        env["WANDB_DIR"] = str(wandb_dir)
    return runner.invoke(app, ["train", *args], env=env)


def _common(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    return [
        *("--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(out)),
        *("--batch-size", "4", "--max-steps", "4", "--optimizer-args", OPT),
        *("--lora-rank", str(RANK)),
    ]


@pytest.fixture(scope="module")
def lora_run(
    model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """``(output dir, wandb dir)`` of a 4-step LoRA run tracked by W&B offline."""
    out = tmp_path_factory.mktemp("lora")
    wandb_dir = tmp_path_factory.mktemp("wandb")
    tracker_args = {"mode": "offline", "project": "tx-test", "dir": str(wandb_dir)}
    result = _train(
        *_common(model_dir, data_file, out),
        *("--save-steps", "2", "--tracker", "wandb", "--tracker-args", json.dumps(tracker_args)),
        wandb_dir=wandb_dir,
    )
    assert result.exit_code == 0, result.output
    return out, wandb_dir


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_lora_loss_falls_and_checkpoints_hold_adapter_and_peft(
    lora_run: tuple[Path, Path],
) -> None:
    out, _ = lora_run
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[3] < losses[2] < losses[1]
    assert np.log(2112) - 1 < losses[1] < np.log(2112) + 2  # a fresh adapter is the base model
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == step
        assert state["lora_rank"] == RANK
        meta = json.loads((ckpt / "metadata.json").read_text())
        assert meta["step"] == step  # the engine's own optimizer step count
        assert meta["has_optimizer"]
        assert (ckpt / "tokenizer.json").is_file()
        assert not (ckpt / "model.safetensors").exists()  # LoRA never rewrites the base
    peft_cfg = json.loads((out / "checkpoint-4" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA"
    assert peft_cfg["r"] == RANK
    tensors = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape[0] == RANK == b.shape[1]
    assert np.abs(b).max() > 0  # B starts at zero: it moved, so the adapter trained


def test_lora_resume_reproduces_the_uninterrupted_run(
    lora_run: tuple[Path, Path], model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    out, _ = lora_run
    result = _train(
        *_common(model_dir, data_file, tmp_path),
        *("--load-checkpoint-path", str(out / "checkpoint-2")),
    )
    assert result.exit_code == 0, result.output
    resumed, full = _losses(tmp_path), _losses(out)
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == full[3]
    assert resumed[4] == full[4]
    final = load_file(tmp_path / "checkpoint-4" / "adapter.safetensors")
    straight = load_file(out / "checkpoint-4" / "adapter.safetensors")
    assert final.keys() == straight.keys()
    for key in final:
        np.testing.assert_array_equal(final[key], straight[key], err_msg=key)


@pytest.mark.parametrize(
    ("lora_args", "expected"),
    [
        ([], "--lora-rank: {ckpt} is a rank-4 LoRA checkpoint; pass --lora-rank 4 (got not given)"),
        (
            ["--lora-rank", "8"],
            "--lora-rank: {ckpt} is a rank-4 LoRA checkpoint; pass --lora-rank 4 (got 8)",
        ),
    ],
)
def test_resume_with_the_wrong_kind_is_one_line(
    lora_args: list[str],
    expected: str,
    lora_run: tuple[Path, Path],
    model_dir: Path,
    data_file: Path,
    tmp_path: Path,
) -> None:
    ckpt = lora_run[0] / "checkpoint-2"
    result = _train(
        *("--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(tmp_path)),
        *("--batch-size", "4", "--max-steps", "4", "--load-checkpoint-path", str(ckpt)),
        *lora_args,
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"Error: {expected.format(ckpt=ckpt)}"


def _wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file.

    Its format is a 7-byte header (``:W&B``, magic, version) and then the LevelDB log format:
    32 KiB blocks of chunks ``crc32c:u32 length:u16 type:u8 data`` (type 1 = whole record,
    2/3/4 = first/middle/last piece), each record a ``wandb_internal_pb2.Record``. wandb 0.31
    ships no Python reader (the Go core writes the file), hence these few lines.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


def test_wandb_offline_run_holds_the_loss_history(lora_run: tuple[Path, Path]) -> None:
    out, wandb_dir = lora_run
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (run_file,) = runs[0].glob("run-*.wandb")
    records = _wandb_records(run_file)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {_key(item): json.loads(item.value_json) for item in rec.history.item}
            history[items["_step"]] = items
    expected = _losses(out)
    assert sorted(history) == sorted(expected)
    for step, loss in expected.items():
        assert history[step]["loss"] == pytest.approx(loss, rel=1e-12)
        assert history[step]["tokens"] > 0
        assert history[step]["tokens_per_s"] > 0
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {_key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["lora_rank"] == RANK
    assert config["learning_rate"] == pytest.approx(2e-2)
    assert run.project == "tx-test"
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0
