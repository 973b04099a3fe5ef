"""Defects found by probing the `tx` command line as a demanding user, one test per defect.

Every failure the user causes (a bad file, a bad option, a reused output directory) must end in
one ``Error: …`` line with exit code 2 and no traceback; every file a run writes must describe
that run only. In-process runs on the tiny Qwen3 with one shape, so the jitted programs compile
once for the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tx_cli.commands.serve import resolve_settings
from tx_cli.main import app

OPT = '{"learning_rate": 1e-3, "weight_decay": 0.0}'
runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": f"the cat sat on mat number {i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _invoke(*args: str) -> Any:
    env = {"COLUMNS": "200", "TX_COMPILATION_CACHE_DIR": ""}
    return runner.invoke(app, list(args), env=env)


def _train(model: Path | str, data: Path | str, out: Path, *extra: str) -> Any:
    return _invoke(
        *("train", "--model", str(model), "--dataset", str(data), "--output-dir", str(out)),
        *("--batch-size", "2", "--optimizer-args", OPT, *extra),
    )


def _one_line_error(result: Any, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert expected in lines[0], lines[0]


def _records(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def full_run(model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step full fine-tune checkpointing every step."""
    out = tmp_path_factory.mktemp("full")
    result = _train(model_dir, data_file, out, "--max-steps", "2", "--save-steps", "1")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ('{"learning_rate": "fast"}', "--optimizer-args: learning_rate must be"),
        ('{"learning_rate": -0.001}', "--optimizer-args: learning_rate must be"),
        ('{"learning_rate": 1e-3, "b1": [1]}', "--optimizer-args: invalid for adamw"),
    ],
)
def test_full_finetune_optimizer_args_fail_before_training(
    args: str, expected: str, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """A string learning rate crashed the first jitted step with a JAX traceback; a negative
    one trained uphill, while the same JSON with --lora-rank is refused."""
    result = _invoke(
        *("train", "--model", str(model_dir), "--dataset", str(data_file)),
        *("--output-dir", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "1"),
        *("--optimizer-args", args),
    )
    _one_line_error(result, expected)
    assert not (tmp_path / "out").exists()


def test_another_optimizer_without_its_arguments_says_the_defaults_are_adamws(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """`--optimizer sgd` alone failed on ``weight_decay``, an argument the user never wrote."""
    result = _invoke(
        *("train", "--model", str(model_dir), "--dataset", str(data_file)),
        *("--output-dir", str(tmp_path), "--batch-size", "2", "--optimizer", "sgd"),
    )
    _one_line_error(result, "the default --optimizer-args are AdamW's")


def test_an_output_dir_that_cannot_be_created_is_one_line(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """An --output-dir naming a file raised FileExistsError with a traceback, after the model
    had loaded and the first step had compiled."""
    file = tmp_path / "file"
    file.write_text("x")
    result = _train(model_dir, data_file, file, "--max-steps", "1")
    _one_line_error(result, f"--output-dir: cannot create {file}")


def test_resume_past_one_epoch_without_max_steps_says_so(
    full_run: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """Without --max-steps (one epoch: 2 steps here) the error named a "--max-steps 2" the
    user never gave."""
    result = _train(
        model_dir, data_file, tmp_path, "--load-checkpoint-path", str(full_run / "checkpoint-2")
    )
    _one_line_error(result, "--max-steps not given: one epoch is 2 steps")


@pytest.mark.parametrize("state", ["{bad json", "[1]", '{"step": 1, "lora_rank": "x"}'])
def test_malformed_trainer_state_is_one_line(
    state: str, full_run: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(state)
    result = _train(
        model_dir,
        data_file,
        tmp_path / "out",
        "--max-steps",
        "2",
        "--load-checkpoint-path",
        str(ckpt),
    )
    _one_line_error(result, "trainer_state.json")


@pytest.mark.parametrize("name", ["optimizer.safetensors", "model.safetensors"])
def test_truncated_checkpoint_file_is_one_line(
    name: str, full_run: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """A checkpoint cut short (disk full, a copy interrupted) ended in a JSONDecodeError or a
    numpy reshape traceback from the safetensors reader; now one line naming the option and
    the file."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for src in (full_run / "checkpoint-1").iterdir():
        (ckpt / src.name).write_bytes(src.read_bytes())
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    result = _train(
        model_dir,
        data_file,
        tmp_path / "out",
        "--max-steps",
        "2",
        "--load-checkpoint-path",
        str(ckpt),
    )
    # the engine's CheckpointError names the cut file and what it lacks
    _one_line_error(result, f"--load-checkpoint-path: {ckpt / name}: tensor ")


def test_resume_with_another_optimizer_names_both(
    full_run: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """The message listed five pytree paths of optax state instead of the two names."""
    result = _invoke(
        *("train", "--model", str(model_dir), "--dataset", str(data_file)),
        *("--output-dir", str(tmp_path), "--batch-size", "2", "--max-steps", "2"),
        *("--optimizer", "sgd", "--optimizer-args", '{"learning_rate": 0.1}'),
        *("--load-checkpoint-path", str(full_run / "checkpoint-1")),
    )
    _one_line_error(result, "was trained with --optimizer adamw")


def test_rerun_and_resume_keep_one_metrics_record_per_step(
    full_run: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """metrics.jsonl was opened for appending: a rerun in the same --output-dir (the README's
    "rerun skips recompiling") logged steps 1, 2, 1, 2, and a resume from checkpoint-1 added a
    second step 2. Now it holds the history of the run that wrote the latest checkpoints."""
    result = _train(model_dir, data_file, tmp_path, "--max-steps", "2", "--save-steps", "1")
    assert result.exit_code == 0, result.output
    first = _records(tmp_path)
    assert first == _records(full_run)[:2]
    result = _train(
        model_dir, data_file, tmp_path, "--max-steps", "2", "--save-steps", "1",
        "--load-checkpoint-path", str(tmp_path / "checkpoint-1"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _records(tmp_path) == first  # steps 1, 2 once; the resumed step 2 is exact
    result = _train(model_dir, data_file, tmp_path, "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert [step for step, _ in _records(tmp_path)] == [1]


def test_a_rewritten_checkpoint_is_replaced_whole_and_names_its_base_absolutely(
    full_run: Path, model_dir: Path, data_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Checkpoints were written file by file into the existing directory: a rerun in an
    output dir holding an earlier run's ``checkpoint-1`` kept that run's other files (a LoRA
    run's PEFT adapter beside a new full model, or a stale ``model.safetensors`` beside a new
    adapter, which ``from_pretrained`` then loads), and an interrupted save left a half
    checkpoint under the final name. A relative ``--model`` was also recorded verbatim, and
    it is what LoRA checkpoints give PEFT as ``base_model_name_or_path``, which PEFT and vLLM
    resolve against *their* working directory. (Full fine-tuning here: a LoRA run costs
    ~25 s of compiling; it reads the same recorded name.)"""
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    stale = ckpt / "adapter_config.json"
    stale.write_text('{"peft_type": "LORA"}')  # what an earlier LoRA run left there
    (tmp_path / ".checkpoint-3.partial").mkdir()  # what an interrupted save left there
    monkeypatch.chdir(model_dir.parent)
    result = _train(model_dir.name, data_file, tmp_path, "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert (ckpt / "model.safetensors").is_file()
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["model"] == str(model_dir.resolve())


def test_a_custom_loader_returning_the_wrong_type_is_one_line(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_probe_loader.py").write_text(
        "def rows(dataset, tokenizer, max_length):\n    return [{'input_tokens': [1, 2]}]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = _train(
        model_dir, data_file, tmp_path / "out", "--loader", "my_probe_loader.rows",
        "--max-steps", "1",
    )  # fmt: skip
    _one_line_error(result, "--loader: my_probe_loader.rows returned dict")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "a"}\n{"text": \n', "JSON parse error"),
        ("", "is empty"),
    ],
)
def test_unreadable_dataset_file_says_why(
    content: str, expected: str, model_dir: Path, tmp_path: Path
) -> None:
    """Malformed JSONL printed a datasets log line and then only "An error occurred while
    generating the dataset"; an empty file said "StopIteration:"."""
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    result = _train(model_dir, data, tmp_path / "out", "--max-steps", "1")
    _one_line_error(result, expected)


def test_demo_rejects_a_negative_learning_rate_before_starting() -> None:
    """It failed after the server had started, with a pydantic traceback from AdamParams."""
    result = _invoke("demo", "--learning-rate", "-1")
    assert result.exit_code == 2, result.output
    assert "--learning-rate" in result.output
    assert "Traceback" not in result.output


def test_make_tiny_model_bad_out_and_lone_tokenizer_only(tmp_path: Path) -> None:
    """--out naming a file raised FileExistsError with a traceback; --tokenizer-only without
    --hf-home was silently ignored (the full model was written); --seed -1 raised ValueError
    with a traceback."""
    file = tmp_path / "file"
    file.write_text("x")
    result = _invoke("make-tiny-model", "--out", str(file))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "--out" in result.output
    result = _invoke("make-tiny-model", "--out", str(tmp_path / "m"), "--tokenizer-only")
    assert result.exit_code == 2, result.output
    assert "--tokenizer-only" in result.output
    assert not (tmp_path / "m").exists()
    result = _invoke("make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "-1")
    assert result.exit_code == 2, result.output
    assert "--seed" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("top", "flag"),
    [
        ({"api_keys_file": Path("/nonexistent/keys.txt")}, "--api-keys-file"),
        ({"api_keys_file": Path(__file__)}, "--api-keys-file: .*expected 'KEY \\[TENANT\\]'"),
        ({"base_models": ["/nonexistent/model"]}, "--base-model"),
        ({"checkpoint_root": Path(__file__)}, "--checkpoint-root"),
    ],
)
def test_serve_rejects_missing_local_paths_before_serving(
    top: dict[str, Any], flag: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A missing or malformed --api-keys-file crashed `tx serve` with a FileNotFoundError or
    ValueError traceback; a
    missing local --base-model, or a --checkpoint-root that is a file, started a server that
    answered healthz 200 and failed only on the first request that needed them."""
    monkeypatch.setenv("TX_DATABASE_URL", f"sqlite:///{tmp_path / 'tx.db'}")
    with pytest.raises(typer.BadParameter, match=flag):
        resolve_settings(top, {})
