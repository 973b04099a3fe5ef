"""`tx demo`: the README's main job — a real server, a LoRA fine-tune through the client, samples.

It builds (or reuses) the deterministic tiny Qwen3 checkpoint with its chat tokenizer, starts
`python -m tx_server` (API + supervised worker process) on a free port over a throw-away SQLite
database, and then behaves like any remote user of the Tinker API through tx-client: it creates
a rank-8 LoRA adapter, samples the reply to a question greedily, fine-tunes on one memorisable
reply with pipelined `forward_backward` + `optim_step`, and samples again. The exit code is 0
only if the loss fell tenfold and the memorised reply came back, so the demo is a check, not a
show.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

QUESTION = "What is the secret word of the tx project?"
ANSWER = "The secret word is jaxopolis.<|im_end|>"
API_KEY = "tml-tx-demo"


def demo(
    steps: Annotated[int, typer.Option(help="Optimizer steps.", min=1)] = 40,
    rank: Annotated[int, typer.Option(help="LoRA rank of the adapter.", min=1)] = 8,
    # min=0: the API's AdamParams rule; a negative rate failed after the server had started,
    # with a pydantic traceback
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.", min=0.0)] = 3e-3,
    seed: Annotated[int, typer.Option(help="Adapter initialisation seed.")] = 0,
) -> None:
    """Serve the tiny model, fine-tune a LoRA adapter through the client, sample before/after."""
    from rich.console import Console

    from tx_engine.testing import ensure_model

    try:
        import tx_client
        import tx_server  # noqa: F401  (run as `python -m tx_server` below)
    except ImportError as exc:
        raise typer.BadParameter(
            f"tx demo needs the server and client extras: pip install 'tx-cli[server,client]' ({exc})"
        ) from None

    console = Console()
    started = time.perf_counter()
    with console.status("building the tiny model"):
        model = str(ensure_model("tiny-qwen3"))
    with _server(model, rank) as url, tx_client.ServiceClient(base_url=url, api_key=API_KEY) as sc:
        console.print(f"server: {url} · model: {model}")
        tc = sc.create_lora_training_client(model, rank=rank, seed=seed)
        prompt, datum, max_tokens = _task(tc.get_tokenizer())
        before = _greedy_reply(tc, prompt, max_tokens)
        losses = _train(tc, datum, steps, learning_rate, console)
        after = _greedy_reply(tc, prompt, max_tokens)
    learned, fell = after == ANSWER, losses[-1] < 0.1 * losses[0]
    console.print(f"\n[bold]Q:[/bold] {QUESTION}")
    console.print(f"[bold]before:[/bold] {before!r}")
    console.print(f"[bold]after:[/bold]  {after!r}")
    verdict = "[green]memorised[/green]" if learned and fell else "[red]NOT memorised[/red]"
    console.print(
        f"\nloss {losses[0]:.3f} -> {losses[-1]:.4f}; reply {verdict}; "
        f"{time.perf_counter() - started:.1f} s"
    )
    raise typer.Exit(0 if learned and fell else 1)


@contextlib.contextmanager
def _server(model: str, rank: int) -> Iterator[str]:
    """`python -m tx_server` on a free port; stopped (with its worker) on exit."""
    with tempfile.TemporaryDirectory(prefix="tx-demo-") as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        env = {
            **os.environ,
            "TX_PORT": str(port),
            "TX_DATABASE_URL": f"sqlite:///{Path(tmp) / 'tx.db'}",
            "TX_CHECKPOINT_ROOT": str(Path(tmp) / "checkpoints"),
            "TX_BASE_MODELS": json.dumps([model]),
            "TX_ENGINE__MAX_LORA_RANK": str(rank),
            "TX_LOG_LEVEL": "warning",
        }
        proc = subprocess.Popen([sys.executable, "-m", "tx_server"], env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the tx server exited with code {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the tx server at {url} did not become healthy in {timeout_s:.0f} s")


def _task(tokenizer: Any) -> tuple[Any, Any, int]:
    """The prompt (chat-templated question) and one datum whose loss is on the reply only."""
    from tx_client import types

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    tokens = prompt + answer
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(
                data=[0.0] * (len(prompt) - 1) + [1.0] * len(answer), dtype="float32"
            ),
        },
    )
    return types.ModelInput.from_ints(prompt), datum, len(answer) + 8


def _greedy_reply(tc: Any, prompt: Any, max_tokens: int) -> str:
    from tx_client import types

    sampler = tc.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    result = sampler.sample(prompt, num_samples=1, sampling_params=params).result()
    text: str = tc.get_tokenizer().decode(result.sequences[0].tokens)
    return text


def _train(tc: Any, datum: Any, steps: int, learning_rate: float, console: Any) -> list[float]:
    """Submit every step at once (the client pipelines them), then read the losses in order."""
    from rich.table import Table

    from tx_client import types

    adam = types.AdamParams(learning_rate=learning_rate)
    pending = []
    for _ in range(steps):
        pending.append((tc.forward_backward([datum], "cross_entropy"), tc.optim_step(adam)))
    table = Table("step", "loss:sum", title="LoRA fine-tuning through the Tinker API")
    losses = []
    for i, (fb, opt) in enumerate(pending, start=1):
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
        if i == 1 or i % max(1, steps // 6) == 0 or i == steps:
            table.add_row(str(i), f"{losses[-1]:.4f}")
    console.print(table)
    return losses
