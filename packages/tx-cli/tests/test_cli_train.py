"""`tx train` end to end on the tiny Qwen3: option surface, errors, training, checkpoints.

Two real training runs are shared by the module (a 4-step run saving every 2 steps, and a
resume of its step-2 checkpoint), so the whole file stays well under a minute on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from tx_cli.commands.train import compilation_cache_dir
from tx_cli.main import app
from tx_cli.train_data import collate
from tx_engine import step as engine_step
from tx_engine.loading import load_model

OPT = '{"learning_rate": 1e-3, "weight_decay": 0.0}'
DOCUMENTED = {  # option -> (metavar, default shown in help or None, required)
    "--model": ("TEXT", None, True),
    "--dataset": ("TEXT", None, True),
    "--loader": ("TEXT", "tx.loaders.text", False),
    "--split": ("TEXT", "train", False),
    "--output-dir": ("PATH", None, True),
    "--load-checkpoint-path": ("PATH", None, False),
    "--save-steps": ("INTEGER", "500", False),
    "--max-steps": ("INTEGER", None, False),
    "--batch-size": ("INTEGER", None, True),
    "--optimizer": ("[adamw]", "adamw", False),
    "--optimizer-args": ("LOADS", '{"learning_rate": 1e-5, "weight_decay": 0.1}', False),
    "--tp-size": ("INTEGER", "1", False),
    "--tracker": ("[wandb]", None, False),
    "--tracker-args": ("LOADS", "{}", False),
    "--lora-rank": ("INTEGER", None, False),  # the one extra beyond the documented surface
}
runner = CliRunner()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": f"the cat sat on mat number {i} and the dog sat too"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(*args: str) -> Any:
    # In-process runs keep the persistent compilation cache off: it is process-global.
    return runner.invoke(
        app, ["train", *args], env={"COLUMNS": "200", "TX_COMPILATION_CACHE_DIR": ""}
    )


@pytest.fixture(scope="module")
def straight(model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    result = _train(
        *("--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(out)),
        *("--batch-size", "4", "--max-steps", "4", "--save-steps", "2", "--optimizer-args", OPT),
    )
    assert result.exit_code == 0, result.output
    return out


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_help_lists_exactly_the_documented_options() -> None:
    # typer vendors its own click, so the command is inspected by attribute, not by class
    train: Any = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {p.opts[0]: p for p in train.params}
    assert set(options) - {"--help"} == set(DOCUMENTED)
    for name, (metavar, default, required) in DOCUMENTED.items():
        param = options[name]
        assert param.metavar == metavar, name
        assert param.required == required, name
        if default is not None:
            assert str(param.default) == default, name
    text = " ".join(_train("--help").output.split())
    for name, (metavar, default, _) in DOCUMENTED.items():
        assert f"{name} {metavar}" in text, name
        if default is not None:
            assert f"[default: {default}]" in text
    assert text.count("[required]") == 4


def test_root_help_and_version() -> None:
    text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for word in ("--install-completion", "--show-completion", "train"):
        assert word in text
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert "tx-cli 0.1.0" in result.output


def test_short_run_loss_falls_and_checkpoints_reload(straight: Path, model_dir: Path) -> None:
    losses = _losses(straight)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[3] < losses[2] < losses[1]
    assert np.log(2112) - 1 < losses[1] < np.log(2112) + 2  # random init ≈ uniform over vocab
    for step in (2, 4):
        ckpt = straight / f"checkpoint-{step}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
        assert (ckpt / "optimizer.safetensors").is_file()
        assert (ckpt / "tokenizer.json").is_file()
    trained, _ = load_model(straight / "checkpoint-4")
    base, _ = load_model(model_dir)
    w_new = np.asarray(trained.model.embed_tokens.weight[...])
    w_old = np.asarray(base.model.embed_tokens.weight[...])
    assert w_new.shape == w_old.shape
    assert not np.allclose(w_new, w_old)


def test_resume_reproduces_the_uninterrupted_run(
    straight: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    result = _train(
        *("--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(tmp_path)),
        *("--batch-size", "4", "--max-steps", "4", "--optimizer-args", OPT),
        *("--load-checkpoint-path", str(straight / "checkpoint-2")),
    )
    assert result.exit_code == 0, result.output
    resumed, full = _losses(tmp_path), _losses(straight)
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == full[3]
    assert resumed[4] == full[4]


def test_resume_past_max_steps_is_a_usage_error(
    straight: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    result = _train(
        *("--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(tmp_path)),
        *("--batch-size", "4", "--max-steps", "2"),
        *("--load-checkpoint-path", str(straight / "checkpoint-4")),
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: --max-steps 2: the checkpoint is already at step 4")


def test_compilation_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unset: the user data directory's ``jax-cache`` (as for `tx serve`); set: that path;
    empty: no cache."""
    monkeypatch.delenv("TX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert compilation_cache_dir() == tmp_path / "data" / "tx" / "jax-cache"
    monkeypatch.setenv("TX_COMPILATION_CACHE_DIR", str(tmp_path / "c"))
    assert compilation_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("TX_COMPILATION_CACHE_DIR", "")
    assert compilation_cache_dir() is None


def test_cli_import_stays_light() -> None:
    """`tx --help` must not pay for jax, datasets or transformers."""
    code = (
        "import sys, tx_cli.main; "
        "print(sorted(m for m in ('jax', 'datasets', 'transformers', 'optax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_tensor_parallel_run_matches_single_device(
    straight: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """--tp-size 2 on two host CPU devices (a subprocess: the device count is fixed at start);
    a subprocess also shows the run writing its programs to the compilation cache."""
    args = ["--model", str(model_dir), "--dataset", str(data_file), "--output-dir", str(tmp_path)]
    args += ["--batch-size", "4", "--max-steps", "2", "--tp-size", "2", "--optimizer-args", OPT]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["TX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")
    cmd = [sys.executable, "-c", "from tx_cli.main import app; app()", "train", *args]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    assert any((tmp_path / "jax-cache").iterdir()), "the run wrote no compiled programs"
    tp, single = _losses(tmp_path), _losses(straight)
    assert sorted(tp) == [1, 2]
    for step in (1, 2):
        assert tp[step] == pytest.approx(single[step], rel=1e-5)


def test_loss_ignores_padding_and_matches_numpy(model_dir: Path) -> None:
    """Same example alone and padded next to a longer one: same summed loss; NumPy oracle.

    The batch goes through the engine's own ``forward`` program on the full fine-tuning split,
    i.e. the loss that :func:`tx_engine.step.full_train_step` differentiates.
    """
    from flax import nnx

    from tx_cli.loaders import Example

    model, _ = load_model(model_dir, max_lora_adapters=1, max_lora_rank=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def total_loss(batch: dict[str, Any]) -> float:
        out = engine_step.forward(graphdef, params, rest, batch, "cross_entropy")
        return float(out.metrics["loss:sum"].sum())

    m: Any = nnx.merge(graphdef, params, rest)
    rng = np.random.default_rng(0)
    short = Example(*rng.integers(0, 2000, (2, 5)).astype(np.int32), rng.random(5, np.float32))
    long = Example(*rng.integers(0, 2000, (2, 20)).astype(np.int32), np.ones(20, np.float32))
    batch = collate([short])
    adapters = jnp.zeros((1,), jnp.int32)
    hidden = m(
        jnp.asarray(batch["input_ids"]),
        positions_bt=jnp.asarray(batch["positions"]),
        attention_mask_bt=jnp.asarray(batch["attention_mask"]),
        adapter_indices_b=adapters,
    )
    z = np.asarray(m.compute_logits(hidden, adapters), np.float64)[0, :5]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -(logp[np.arange(5), short.target_tokens] * short.weights).sum()
    w_short, w_long = float(short.weights.sum()), 20.0
    # weights are normalised per batch: the summed loss is the weighted-token mean
    np.testing.assert_allclose(total_loss(batch), nll / w_short, rtol=1e-4)
    long_nll = total_loss(collate([long])) * w_long
    both = total_loss(collate([short, long]))
    np.testing.assert_allclose(both, (nll + long_nll) / (w_short + w_long), rtol=1e-4)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--optimizer-args", "{not json"], "--optimizer-args: malformed JSON"),
        (["--optimizer-args", "[1]"], "--optimizer-args: expected a JSON object"),
        (["--optimizer-args", '{"bogus": 1}'], "--optimizer-args: invalid for adamw"),
        (["--tracker-args", "{"], "--tracker-args: malformed JSON"),
        (["--tracker", "mlflow"], "--tracker: unknown tracker 'mlflow'; choose wandb"),
        (["--tracker", "wandb", "--tracker-args", '{"bogus": 1}'], "--tracker-args: "),
        (["--lora-rank", "0"], "--lora-rank: must be >= 1, got 0"),
        (["--lora-rank", "2", "--optimizer", "sgd"], "--optimizer: LoRA training"),
        (["--lora-rank", "2", "--optimizer-args", '{"b3": 1}'], "b3 not supported with"),
        (["--loader", "tx.loaders.nope"], "unknown loader 'tx.loaders.nope'"),
        (["--optimizer", "adagrad"], "--optimizer: unknown optimizer 'adagrad'"),
        (["--dataset", "MISSING"], "dataset file not found"),
        (["--split", "test"], "unknown split 'test'"),
        (["--loader", "tx.loaders.chat"], "dataset has no column 'messages'"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--tp-size", "2"], "--tp-size: mesh"),
        (["--model", "MISSING"], "--model: "),
        (["--model", "EMPTY_DIR"], "--model: cannot load a tokenizer"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    args: list[str], expected: str, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    base = {
        "--model": str(model_dir),
        "--dataset": str(data_file),
        "--output-dir": str(tmp_path / "out"),
        "--batch-size": "2",
        "--max-steps": "1",
    }
    given = dict(zip(args[::2], args[1::2], strict=True))
    for key in ("--dataset", "--model"):
        if given.get(key) == "MISSING":
            given[key] = str(tmp_path / "missing.jsonl" if key == "--dataset" else "./no/model")
    if given.get("--model") == "EMPTY_DIR":
        (tmp_path / "empty").mkdir()
        given["--model"] = str(tmp_path / "empty")
    result = _train(*[x for kv in {**base, **given}.items() for x in kv])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("Error: ")
    assert expected in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "checkpoint-1").exists()
