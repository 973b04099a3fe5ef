"""`tx train`: fine-tuning of a model on a dataset, offline, from the command line.

Full fine-tuning by default (:class:`tx_cli.train_loop.FullTrainer`), LoRA with ``--lora-rank``
(:class:`tx_cli.train_lora.LoraTrainer`); both run the engine's jitted programs.
The option surface is documented and fixed (see the issue "tx-cli"), ``--lora-rank`` being
the one extra; JSON options and the
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

from tx_engine.compile_cache import cache_dir_from, enable_compilation_cache

DEFAULT_OPTIMIZER_ARGS = '{"learning_rate": 1e-5, "weight_decay": 0.1}'
MAX_LENGTH = 2048  # longest training sequence in tokens; longer ones are truncated
CACHE_DIR_ENV = "TX_COMPILATION_CACHE_DIR"


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
    lora_rank: Annotated[
        int | None,
        typer.Option(
            metavar="INTEGER", help="Train a LoRA adapter of this rank instead of all weights"
        ),
    ] = None,
) -> None:
    """Fine-tune MODEL on DATASET (full fine-tuning, or LoRA with --lora-rank)."""
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
    for name in ("max_steps", "lora_rank"):
        if opts[name] is not None and opts[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {opts[name]}")


def _run(opts: dict[str, Any]) -> None:
    from tx_cli.loaders import TrainInputError, resolve_loader
    from tx_cli.train_loop import OPTIMIZERS
    from tx_cli.train_tracker import TRACKERS

    _check_numbers(opts)
    opt_args = _json_object("--optimizer-args", opts["optimizer_args"])
    tracker_args = _json_object("--tracker-args", opts["tracker_args"])
    if opts["optimizer"] not in OPTIMIZERS:
        raise UsageError(
            f"--optimizer: unknown optimizer {opts['optimizer']!r}; "
            f"choose one of {', '.join(OPTIMIZERS)}"
        )
    try:
        _check_optimizer(opts["optimizer"], opt_args, opts["lora_rank"])
    except TrainInputError as e:
        if opts["optimizer_args"] != DEFAULT_OPTIMIZER_ARGS:
            raise
        # `--optimizer sgd` alone failed on an argument the user never wrote
        raise UsageError(
            f"{e} (the default --optimizer-args are AdamW's; pass --optimizer-args for "
            f"{opts['optimizer']})"
        ) from e
    if opts["tracker"] is not None and opts["tracker"] not in TRACKERS:
        raise UsageError(
            f"--tracker: unknown tracker {opts['tracker']!r}; choose {', '.join(TRACKERS)}"
        )
    load_fn = resolve_loader(opts["loader"])
    try:  # now, not after loading the model: mkdir raised a traceback after the slow part
        Path(opts["output_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir: cannot create {opts['output_dir']}: {e}") from e
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torch-missing banner
    from tx_cli.train_data import open_dataset

    data = open_dataset(opts["dataset"], opts["split"])
    _train(opts, load_fn, data, opt_args, tracker_args)


def _check_optimizer(name: str, args: dict[str, Any], lora_rank: int | None) -> None:
    """Build the optimizer once before any heavy work, so bad arguments fail in a second."""
    if lora_rank is None:
        from tx_cli.train_loop import make_optimizer

        make_optimizer(name, args)
    else:
        from tx_cli.train_lora import adam_params

        adam_params(name, args)


def _train(
    opts: dict[str, Any],
    load_fn: Any,
    data: Any,
    opt_args: dict[str, Any],
    tracker_args: dict[str, Any],
) -> None:
    from transformers import AutoTokenizer

    from tx_cli import train_checkpoint
    from tx_cli.train_loop import TrainSettings, run
    from tx_cli.train_tracker import open_tracker

    model_dir = _resolve_model(opts["model"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: cannot load a tokenizer from {model_dir} ({e})") from e
    examples = _checked_examples(opts["loader"], load_fn(data, tokenizer, MAX_LENGTH))
    if not examples:
        raise UsageError(f"--dataset: {opts['dataset']!r} produced no training examples")
    resume = opts["load_checkpoint_path"]
    if resume is not None:
        if not Path(resume).is_dir():
            raise UsageError(f"--load-checkpoint-path: {resume} is not a directory")
        train_checkpoint.check_kind(Path(resume), opts["lora_rank"], opts["optimizer"])
    steps_per_epoch = -(-len(examples) // opts["batch_size"])
    if resume is not None and opts["max_steps"] is None:
        done = train_checkpoint.read_step(Path(resume))
        if done >= steps_per_epoch:  # "--max-steps N" alone puzzled when none was given
            raise UsageError(
                f"--max-steps not given: one epoch is {steps_per_epoch} steps and the "
                f"checkpoint is already at step {done}; pass a larger --max-steps"
            )
    keys = ("dataset", "loader", "split", "batch_size", "lora_rank")
    local = Path(opts["model"]).expanduser().is_dir()
    settings = TrainSettings(
        output_dir=opts["output_dir"],
        batch_size=opts["batch_size"],
        max_steps=opts["max_steps"] or steps_per_epoch,
        save_steps=opts["save_steps"],
        optimizer=opts["optimizer"],
        optimizer_args=opt_args,
        # a local --model is recorded absolute: PEFT resolves base_model_name_or_path (and a
        # reader of trainer_state.json a path) against its own directory, not ours
        meta={"model": str(model_dir.resolve()) if local else opts["model"]}
        | {k: opts[k] for k in keys},
    )
    cache_dir = compilation_cache_dir()
    if cache_dir is not None:
        enable_compilation_cache(cache_dir)
    trainer = _trainer(opts, model_dir, settings)
    config = {**settings.meta, "optimizer": settings.optimizer, **opt_args}
    with open_tracker(opts["tracker"], tracker_args, config) as log:
        losses = run(trainer, examples, tokenizer, settings, log)
    if losses:
        typer.echo(f"trained {len(losses)} steps, final loss {losses[-1]:.4f}")
    typer.echo(f"checkpoint: {settings.output_dir / f'checkpoint-{settings.max_steps}'}")


def _checked_examples(loader: str, examples: Any) -> list[Any]:
    """``examples`` if it is a list of :class:`Example`; a custom loader that returns anything
    else fails here in one line rather than with an ``AttributeError`` deep in batching."""
    from tx_cli.loaders.base import Example

    if not isinstance(examples, list):
        raise UsageError(
            f"--loader: {loader} returned {type(examples).__name__}, expected a list of Example"
        )
    for item in examples:
        if not isinstance(item, Example):
            raise UsageError(
                f"--loader: {loader} returned {type(item).__name__} items, "
                "expected tx_cli.loaders.Example"
            )
    return examples


def compilation_cache_dir() -> Path | None:
    """Where compiled programs persist between runs: the cache `tx serve`'s worker uses.

    Why: each run of the same model and batch shapes compiled the same programs again (tens of
    seconds on CPU for the small presets, before the first step). ``TX_COMPILATION_CACHE_DIR``
    moves it, as it does for the server, and an empty value turns it off; the default is
    ``jax-cache`` in the user data directory (``tx_engine.compile_cache.default_cache_dir``).
    """
    return cache_dir_from(os.environ.get(CACHE_DIR_ENV))


def _trainer(opts: dict[str, Any], model_dir: Path, settings: Any) -> Any:
    """The LoRA trainer with ``--lora-rank``, else full fine-tuning from the real weights."""
    from tx_cli import train_checkpoint

    mesh = _mesh(opts["tp_size"])
    resume = opts["load_checkpoint_path"]
    if opts["lora_rank"] is not None:
        from tx_cli.train_lora import LoraTrainer

        return LoraTrainer(model_dir, opts["lora_rank"], settings, resume, opts["tp_size"])
    from tx_cli.train_loop import FullTrainer
    from tx_engine.loading import load_model

    source = Path(resume) if resume is not None else model_dir
    option = "--model" if resume is None else "--load-checkpoint-path"
    with train_checkpoint.reading(option, source):
        model, _ = load_model(source, max_lora_adapters=1, max_lora_rank=1, mesh=mesh)
    return FullTrainer(model, settings, resume)


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
