"""`tx demo`: the README's main job — fine-tune a LoRA adapter on the tiny model, end to end.

It builds (or reuses) the deterministic tiny Qwen3 checkpoint and its chat tokenizer, asks the
base model a question, fine-tunes a fresh rank-8 LoRA adapter on one memorisable reply with the
same `forward_backward` + `optim_step` the server runs, and asks again. The exit code is 0 only
if the loss fell and greedy sampling now returns the memorised reply, so the demo is a check,
not a show.

The demo drives the engine in-process; once the server's sampling routes land it will go
through `tx serve` + tx-client instead (issue "tx-cli" item 5).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

QUESTION = "What is the secret word of the tx project?"
ANSWER = "The secret word is jaxopolis."


def demo(
    steps: Annotated[int, typer.Option(help="Optimizer steps.", min=1)] = 40,
    rank: Annotated[int, typer.Option(help="LoRA rank of the adapter.", min=1)] = 8,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Adapter initialisation seed.")] = 0,
) -> None:
    """Fine-tune a LoRA adapter on the built-in tiny model and show it learned a reply."""
    from rich.console import Console

    console = Console()
    started = time.perf_counter()
    setup = _setup(rank, seed, console)
    before = _greedy_reply(setup)
    losses = _train(setup, steps, learning_rate, console)
    after = _greedy_reply(setup)
    learned = after == setup["answer_text"]
    fell = losses[-1] < 0.1 * losses[0]
    console.print(f"\n[bold]Q:[/bold] {QUESTION}")
    console.print(f"[bold]before:[/bold] {before!r}")
    console.print(f"[bold]after:[/bold]  {after!r}")
    verdict = "[green]memorised[/green]" if learned and fell else "[red]NOT memorised[/red]"
    console.print(
        f"\nloss {losses[0]:.3f} -> {losses[-1]:.4f}; reply {verdict}; "
        f"{time.perf_counter() - started:.1f} s"
    )
    raise typer.Exit(0 if learned and fell else 1)


def _setup(rank: int, seed: int, console: Any) -> dict[str, Any]:
    import numpy as np
    from transformers import AutoTokenizer

    from tx_engine.batching import DatumArrays
    from tx_engine.config import EngineConfig
    from tx_engine.engine import TrainingEngine
    from tx_engine.sampler import Sampler
    from tx_engine.testing import ensure_model

    with console.status("building the tiny model and loading the engine"):
        model_dir = ensure_model("tiny-qwen3")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        engine = TrainingEngine(model_dir, EngineConfig(max_lora_adapters=1, max_lora_rank=rank))
        slot = engine.create_adapter(rank=rank, seed=seed)
    messages = [{"role": "user", "content": QUESTION}]
    prompt_text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    end_of_turn = "<|im_end|>"
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    answer = tokenizer.encode(ANSWER + end_of_turn, add_special_tokens=False)
    tokens = np.asarray(prompt + answer, np.int32)
    weights = np.asarray([0.0] * (len(prompt) - 1) + [1.0] * len(answer), np.float32)
    datum = DatumArrays(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights})
    console.print(f"model: {model_dir} · adapter slot {slot} (rank {rank})")
    return {
        "engine": engine,
        "sampler": Sampler(engine),  # stops on the EOS token <|im_end|>
        "tokenizer": tokenizer,
        "slot": slot,
        "prompt": np.asarray(prompt, np.int32),
        "max_tokens": len(answer) + 8,
        "datum": datum,
        "answer_text": ANSWER + end_of_turn,
    }


def _greedy_reply(setup: dict[str, Any]) -> str:
    from tx_engine.sampler import SampleRequestArrays

    request = SampleRequestArrays(
        prompt_tokens=setup["prompt"],
        max_tokens=setup["max_tokens"],
        temperature=0.0,
        adapter=setup["slot"],
    )
    (result,) = setup["sampler"].sample([request])
    text: str = setup["tokenizer"].decode(result.sequences[0].tokens.tolist())
    return text


def _train(setup: dict[str, Any], steps: int, learning_rate: float, console: Any) -> list[float]:
    from rich.table import Table

    from tx_engine.batching import AdapterBatch
    from tx_engine.engine import AdamParams

    engine, slot = setup["engine"], setup["slot"]
    batch = [AdapterBatch(slot, [setup["datum"]], "cross_entropy")]
    adam = AdamParams(learning_rate=learning_rate)
    table = Table("step", "loss:sum", "grad norm", title="LoRA fine-tuning (cross_entropy)")
    losses = []
    for i in range(1, steps + 1):
        (out,) = engine.forward_backward(batch)
        metrics = engine.optim_step(slot, adam)
        losses.append(out.metrics["loss:sum"])
        if i == 1 or i % max(1, steps // 6) == 0 or i == steps:
            table.add_row(str(i), f"{losses[-1]:.4f}", f"{metrics['grad_norm']:.3f}")
    console.print(table)
    return losses
