"""`tx serve`: the Tinker REST API + its worker, configured by flags or `TX_*` variables.

Every flag defaults to "not given" so that `TX_*` environment variables (pydantic-settings, see
`tx_server.settings`) still apply; a given flag wins over the environment. With no base model
from either, the built-in tiny Qwen3 is built (or reused) and served, so `tx serve` works on a
fresh machine with no network. tx-server is imported inside the command: `tx --help` stays fast
and tx-cli does not need the server extra unless this command runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer


def serve(
    ctx: typer.Context,
    base_models: Annotated[
        list[str] | None,
        typer.Option(
            "--base-model",
            metavar="TEXT",
            help="HF model id or local dir to serve (repeatable) (default: the tiny Qwen3)",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Bind address (default: 127.0.0.1)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(metavar="INTEGER", help="Port (default: 8000)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(metavar="TEXT", help="SQLAlchemy URL (sqlite:///… or postgresql://…)"),
    ] = None,
    checkpoint_root: Annotated[
        Path | None, typer.Option(metavar="PATH", help="Checkpoint directory")
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="File of accepted API keys (`KEY [TENANT]` per line)"),
    ] = None,
    max_lora_adapters: Annotated[
        int | None, typer.Option(metavar="INTEGER", help="Adapter slots")
    ] = None,
    max_lora_rank: Annotated[
        int | None, typer.Option(metavar="INTEGER", help="Largest LoRA rank")
    ] = None,
    max_seq_len: Annotated[
        int | None, typer.Option(metavar="INTEGER", help="Longest sequence")
    ] = None,
    mesh_tp: Annotated[
        int | None, typer.Option("--tp-size", metavar="INTEGER", help="Tensor parallelism")
    ] = None,
    mesh_fsdp: Annotated[
        int | None, typer.Option("--fsdp-size", metavar="INTEGER", help="FSDP degree")
    ] = None,
    mesh_dp: Annotated[
        int | None, typer.Option("--dp-size", metavar="INTEGER", help="Data parallelism")
    ] = None,
    mesh_ep: Annotated[
        int | None,
        typer.Option("--ep-size", metavar="INTEGER", help="Expert parallelism (MoE models)"),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT", help="Weights and compute dtype: float32, bfloat16 or float16"
        ),
    ] = None,
    tokens_per_micro_batch: Annotated[
        int | None,
        typer.Option(metavar="INTEGER", help="Tokens per training micro-batch (activation memory)"),
    ] = None,
    sample_tokens_per_batch: Annotated[
        int | None,
        typer.Option(metavar="INTEGER", help="KV-cache slots of one sampling batch"),
    ] = None,
    sample_prefix_cache_tokens: Annotated[
        int | None,
        typer.Option(
            "--prefix-cache-tokens",
            metavar="INTEGER",
            help="Token slots of each base model's sampling prefix cache (0 = off)",
        ),
    ] = None,
    sample_decode_chunk: Annotated[
        int | None,
        typer.Option(
            "--decode-chunk",
            metavar="INTEGER",
            help="Decode steps per sampling dispatch (stops are checked between dispatches)",
        ),
    ] = None,
) -> None:
    """Serve the Tinker API (and its worker) until interrupted."""
    top = {
        "base_models": base_models or None,
        "host": host,
        "port": port,
        "database_url": database_url,
        "checkpoint_root": checkpoint_root,
        "api_keys_file": api_keys_file,
    }
    engine = {
        "max_lora_adapters": max_lora_adapters,
        "max_lora_rank": max_lora_rank,
        "max_seq_len": max_seq_len,
        "mesh_tp": mesh_tp,
        "mesh_fsdp": mesh_fsdp,
        "mesh_dp": mesh_dp,
        "mesh_ep": mesh_ep,
        "dtype": dtype,
        "tokens_per_micro_batch": tokens_per_micro_batch,
        "sample_tokens_per_batch": sample_tokens_per_batch,
        "sample_prefix_cache_tokens": sample_prefix_cache_tokens,
        "sample_decode_chunk": sample_decode_chunk,
    }
    # Parameters are named after their settings fields, so a field's flag is its option's.
    flag_of = {p.name: p.opts[0] for p in ctx.command.params if p.name and p.opts}
    settings = resolve_settings(_given(top), _given(engine), flag_of)
    from tx_server.hub import BaseModelError
    from tx_server.serve import serve as run

    typer.echo(
        f"serving {', '.join(settings.base_models)} on http://{settings.host}:{settings.port}"
    )
    try:
        run(settings)
    except BaseModelError as e:  # a hub model that cannot be had: one line, not a traceback
        raise typer.BadParameter(str(e), param_hint=flag_of.get("base_models")) from None


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def resolve_settings(
    top: dict[str, Any], engine: dict[str, Any], flag_of: Mapping[str, str] | None = None
) -> Any:
    """``tx_server.settings.Settings`` from the given flags over ``TX_*`` variables; the tiny
    Qwen3 when neither names a base model. A bad value is a usage error naming the flag
    (``flag_of[field]``, else ``--field-with-dashes``) or the variable it came from."""
    from tx_server.settings import EngineSettings, Settings

    def flags(given: dict[str, Any]) -> dict[str, str]:
        return {f: (flag_of or {}).get(f, "--" + f.replace("_", "-")) for f in given}

    env = _validated(Settings, (), {})
    merged = _validated(
        lambda: EngineSettings(**{**env.engine.model_dump(), **engine}), ("engine",), flags(engine)
    )
    settings = _validated(lambda: Settings(**top, engine=merged), (), flags(top))
    _check_paths(settings, flags(top))
    if not settings.base_models:
        from tx_engine.testing import ensure_model

        settings = Settings(**top, engine=merged, base_models=[str(ensure_model("tiny-qwen3"))])
    return settings


def _check_paths(settings: Any, flags: dict[str, str]) -> None:
    """The API keys file must parse, and local paths must exist, before the server starts.

    Why: a missing or malformed ``--api-keys-file`` crashed with a ``FileNotFoundError`` or
    ``ValueError`` traceback, and a missing local ``--base-model`` or a ``--checkpoint-root``
    that is a file started a server that answered healthz and failed only on the first request
    needing them. A base model counts as local when spelled as a path
    (:func:`tx_server.hub.check_local_path`); anything else is a hub id.
    """
    from tx_server.auth import Keyring
    from tx_server.hub import BaseModelError, check_local_path

    def name(field: str) -> str:
        return flags.get(field) or "TX_" + field.upper()

    try:  # read the keys file as the server will, once, at start
        Keyring.from_settings(settings)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise typer.BadParameter(f"{name('api_keys_file')}: {e}") from None
    for model in settings.base_models:
        try:  # the rule the server applies at start, checked before anything starts
            check_local_path(model)
        except BaseModelError as e:
            raise typer.BadParameter(f"{name('base_models')}: {e}") from None
    root = Path(settings.checkpoint_root)
    if root.exists() and not root.is_dir():
        raise typer.BadParameter(f"{name('checkpoint_root')}: {root} is not a directory")


def _validated(build: Callable[[], Any], prefix: tuple[str, ...], flags: dict[str, str]) -> Any:
    """``build()``; a validation error becomes a usage error naming the field's flag if it was
    given (``flags``: field → flag) or else its ``TX_*`` variable (``prefix``: the settings'
    place in Settings)."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as exc:
        first = exc.errors()[0]
        fields = [str(p) for p in first["loc"] if isinstance(p, str)]  # not list indices
        name = flags.get(fields[0]) or "TX_" + "__".join((*prefix, *fields)).upper()
        raise typer.BadParameter(f"{name}: {first['msg']}") from None
