"""`tx make-tiny-model`: write a deterministic tiny checkpoint for offline tests and demos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def make_tiny_model(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the checkpoint into.")],
    preset: Annotated[
        str, typer.Argument(help="Preset name: tiny-qwen3, tiny-llama3, tiny-qwen3-moe or small.")
    ] = "tiny-qwen3",
    # min=0: numpy's rule; a negative seed ended in a ValueError traceback
    seed: Annotated[int, typer.Option(help="Seed of the random weights.", min=0)] = 0,
    sharded: Annotated[
        bool, typer.Option("--sharded", help="Write 3 shards plus model.safetensors.index.json.")
    ] = False,
    hf_home: Annotated[
        Path | None,
        typer.Option(
            "--hf-home", help="Also install into this HF_HOME's hub cache (needs --repo-id)."
        ),
    ] = None,
    repo_id: Annotated[
        str | None,
        typer.Option("--repo-id", help="Hub name to install as, e.g. Qwen/Qwen3-8B."),
    ] = None,
    tokenizer_only: Annotated[
        bool,
        typer.Option("--tokenizer-only", help="Install only the tokenizer files (with --hf-home)."),
    ] = False,
) -> None:
    """Build PRESET with seeded random weights in Hugging Face layout.

    With --hf-home and --repo-id the model is also installed in that hub cache, so that with
    HF_HOME=<dir> and HF_HUB_OFFLINE=1 the hub name resolves to it without a network.
    """
    if (hf_home is None) != (repo_id is None):
        raise typer.BadParameter(
            "--hf-home and --repo-id must be given together", param_hint="--repo-id"
        )
    # Why: without --hf-home the flag was silently ignored and the whole model was written.
    if tokenizer_only and hf_home is None:
        raise typer.BadParameter(
            "--tokenizer-only applies to the hub-cache install; add --hf-home and --repo-id",
            param_hint="--tokenizer-only",
        )
    if out.exists() and not out.is_dir():  # else a FileExistsError traceback from mkdir
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    from tx_engine.testing import PRESETS, build_model, count_parameters, install_into_hf_cache

    if preset not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}", param_hint="PRESET"
        )
    path = build_model(preset, out, seed=seed, sharded=sharded)
    n_params = count_parameters(json.loads((path / "config.json").read_text()))
    typer.echo(f"wrote {preset} (seed {seed}, {n_params:,} parameters) to {path}")
    if hf_home is not None and repo_id is not None:
        try:
            snapshot = install_into_hf_cache(path, repo_id, hf_home, tokenizer_only=tokenizer_only)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--repo-id") from e
        typer.echo(f"installed as {repo_id} in {snapshot}")
