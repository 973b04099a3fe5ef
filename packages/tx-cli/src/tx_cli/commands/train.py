"""`tx train`: full fine-tuning of a model on a dataset, offline, from the command line.

The option surface is documented and fixed (see the issue "tx-cli"); JSON options and the
optimizer/tracker names are plain strings validated here instead of click types, because a bad
value must end in *one* line naming the problem and exit code 2, not a usage panel. Cheap
checks run first; datasets, transformers and jax are imported only after them, inside the
command, so `tx --help` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_OPTIMIZER_ARGS = '{"learning_rate": 1e-5, "weight_decay": 0.1}'
MAX_LENGTH = 2048  # longest training sequence in tokens; longer ones are truncated
TRACKERS = ("wandb",)


class UsageError(ValueError):
    """A bad command-line value; printed as one line with exit code 2."""


def _json_object(option: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{option}: malformed JSON ({e.msg} at char {e.pos})") from e
    if not isinstance(value, dict):
        raise UsageError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {' '.join(message.split())}", err=True)
    return typer.Exit(code=2)


def train(
    *,
    model: Annotated[
        str,
        typer.Option(metavar="TEXT", help="HuggingFace model ID or local model path"),
    ],
    dataset: Annotated[
        str,
        typer.Option(metavar="TEXT", help="HuggingFace dataset to use for training"),
    ],
    loader: Annotated[
        str, typer.Option(metavar="TEXT", help="Loader used for loading the dataset")
    ] = "tx.loaders.text",
    split: Annotated[str, typer.Option(metavar="TEXT", help="The dataset split to use")] = "train",
    output_dir: Annotated[
        Path,
        typer.Option(metavar="PATH", help="Where model predictions and checkpoints are written"),
    ],
    load_checkpoint_path: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="If specified, resume training from this checkpoint"),
    ] = None,
    save_steps: Annotated[
        int, typer.Option(metavar="INTEGER", help="Number of steps between checkpoints")
    ] = 500,
    max_steps: Annotated[
        int | None, typer.Option(metavar="INTEGER", help="The maximum number of training steps")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(metavar="INTEGER", help="Batch size of each training batch")
    ],
    optimizer: Annotated[
        str, typer.Option(metavar="[adamw]", help="Which optax optimizer to use")
    ] = "adamw",
    optimizer_args: Annotated[
        str, typer.Option(metavar="LOADS", help="Optimizer arguments as JSON")
    ] = DEFAULT_OPTIMIZER_ARGS,
    tp_size: Annotated[int, typer.Option(metavar="INTEGER", help="Tensor parallelism degree")] = 1,
    tracker: Annotated[
        str | None, typer.Option(metavar="[wandb]", help="Experiment tracker to report results to")
    ] = None,
    tracker_args: Annotated[
        str, typer.Option(metavar="LOADS", help="Tracker arguments as JSON")
    ] = "{}",
) -> None:
    """Fine-tune MODEL on DATASET (full fine-tuning, checkpoints in Hugging Face layout)."""
    from tx_cli.loaders.base import TrainInputError

    try:
        _run(locals())
    except (UsageError, TrainInputError) as e:
        raise _fail(str(e)) from None
    except Exception as e:  # engine errors about the user's files (config, checkpoint keys)
        if getattr(e, "category", None) == "user":
            raise _fail(f"{type(e).__name__}: {e}") from None
        raise


def _check_numbers(opts: dict[str, Any]) -> None:
    for name in ("batch_size", "save_steps", "tp_size"):
        if opts[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {opts[name]}")
    if opts["max_steps"] is not None and opts["max_steps"] < 1:
        raise UsageError(f"--max-steps: must be >= 1, got {opts['max_steps']}")


def _run(opts: dict[str, Any]) -> None:
    from tx_cli.loaders import resolve_loader
    from tx_cli.train_loop import OPTIMIZERS

    _check_numbers(opts)
    opt_args = _json_object("--optimizer-args", opts["optimizer_args"])
    tracker_args = _json_object("--tracker-args", opts["tracker_args"])
    if opts["optimizer"] not in OPTIMIZERS:
        raise UsageError(
            f"--optimizer: unknown optimizer {opts['optimizer']!r}; "
            f"choose one of {', '.join(OPTIMIZERS)}"
        )
    if opts["tracker"] is not None and opts["tracker"] not in TRACKERS:
        raise UsageError(f"--tracker: unknown tracker {opts['tracker']!r}; choose wandb")
    load_fn = resolve_loader(opts["loader"])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torch-missing banner
    from tx_cli.train_data import open_dataset

    data = open_dataset(opts["dataset"], opts["split"])
    log = _make_tracker(opts["tracker"], tracker_args)
    _train(opts, load_fn, data, opt_args, log)


def _train(
    opts: dict[str, Any], load_fn: Any, data: Any, opt_args: dict[str, Any], log: Any
) -> None:
    from transformers import AutoTokenizer

    from tx_cli.train_loop import TrainSettings, train
    from tx_engine.loading import load_model

    model_dir = _resolve_model(opts["model"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: cannot load a tokenizer from {model_dir} ({e})") from e
    examples = load_fn(data, tokenizer, MAX_LENGTH)
    if not examples:
        raise UsageError(f"--dataset: {opts['dataset']!r} produced no training examples")
    weights_dir = opts["load_checkpoint_path"] or model_dir
    if not Path(weights_dir).is_dir():
        raise UsageError(f"--load-checkpoint-path: {weights_dir} is not a directory")
    mesh = _mesh(opts["tp_size"])
    model, _ = load_model(weights_dir, max_lora_adapters=1, max_lora_rank=1, mesh=mesh)
    steps_per_epoch = -(-len(examples) // opts["batch_size"])
    settings = TrainSettings(
        output_dir=opts["output_dir"],
        batch_size=opts["batch_size"],
        max_steps=opts["max_steps"] or steps_per_epoch,
        save_steps=opts["save_steps"],
        optimizer=opts["optimizer"],
        optimizer_args=opt_args,
        meta={"model": opts["model"], "dataset": opts["dataset"], "loader": opts["loader"]},
    )
    losses = train(model, examples, tokenizer, settings, opts["load_checkpoint_path"], log)
    if losses:
        typer.echo(f"trained {len(losses)} steps, final loss {losses[-1]:.4f}")
    typer.echo(f"checkpoint: {settings.output_dir / f'checkpoint-{settings.max_steps}'}")


def _resolve_model(model: str) -> Path:
    """A local checkpoint directory, or the hub snapshot of ``model`` (cache first)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith((".", "/", "~")) or path.suffix:
        raise UsageError(f"--model: {model} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as e:  # offline, unknown repo, gated: all mean "cannot get this model"
        raise UsageError(f"--model: cannot find {model!r} locally or on the hub ({e})") from e


def _mesh(tp_size: int) -> Any:
    if tp_size == 1:
        return None
    from tx_engine.sharding import make_mesh

    try:
        return make_mesh(tp=tp_size)
    except ValueError as e:
        raise UsageError(f"--tp-size: {e}") from e


def _make_tracker(name: str | None, args: dict[str, Any]) -> Any:
    """A ``log(metrics, step)`` callable for ``name``, or None without a tracker."""
    if name is None:
        return None
    try:
        import wandb
    except ImportError as e:
        raise UsageError("--tracker wandb: the wandb package is not installed") from e
    run = wandb.init(**args)
    return lambda metrics, step: run.log(metrics, step=step)
