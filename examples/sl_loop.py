"""Supervised fine-tuning through the Tinker API with tx-client: a LoRA adapter learns 12 replies.

Each conversation is rendered with the base model's own chat template; the loss is on the
assistant's tokens only (``weights`` are 0 on the prompt), so the adapter learns to answer,
not to repeat questions. Runs against any Tinker-compatible server:

    TX_BASE_URL=http://127.0.0.1:8000 uv run python examples/sl_loop.py --steps 20
    uv run python examples/sl_loop.py --base-url http://my-tx:8000 --base-model Qwen/Qwen3-8B

The official SDK runs it unchanged: swap the two imports for ``import tinker as tx_client`` and
``from tinker import types``.
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

import tx_client
from tx_client import types

CONVERSATIONS = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is two plus three?", "Five."),
    ("Which planet is called the red planet?", "Mars."),
    ("What do bees make?", "Honey."),
    ("What is the opposite of hot?", "Cold."),
    ("Which animal says moo?", "A cow."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
    ("What do you call a baby cat?", "A kitten."),
    ("Which ocean is the largest?", "The Pacific."),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("TX_BASE_URL"), help="server URL")
    p.add_argument("--api-key", default=os.environ.get("TX_API_KEY", "tml-local-examples"))
    p.add_argument(
        "--base-model",
        default=os.environ.get("TX_BASE_MODEL"),
        help="model to fine-tune (default: the first one the server serves)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=12, help="conversations per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="adapter init and data-order seed")
    return p.parse_args(argv)


def pick_base_model(sc: Any, requested: str | None) -> str:
    """The requested model, else the first one the server lists (``tx serve``'s tiny Qwen3)."""
    if requested:
        return requested
    capabilities = sc.create_rest_client().get_server_capabilities().result()
    names = [m.model_name for m in capabilities.supported_models if m.model_name]
    if not names:
        raise SystemExit("--base-model: the server lists no models; name one")
    print(f"base model: {names[0]}")
    return str(names[0])


def render(tokenizer: Any, question: str, answer: str) -> types.Datum:
    """One next-token-prediction datum whose loss weights are 1 on the assistant reply only.

    Prompt and reply are tokenized separately so the boundary is exact: the prompt is what the
    chat template produces when asked for a generation prompt, the reply is the rest.
    """
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=False, enable_thinking=False
    )
    if not full.startswith(prompt):
        raise ValueError("chat template: the rendered conversation does not extend the prompt")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    reply_ids = tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
    tokens = prompt_ids + reply_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(reply_ids)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(data=weights, dtype="float32"),
        },
    )


def train(tc: Any, data: list[types.Datum], args: argparse.Namespace) -> list[float]:
    """The loop: one forward_backward + optim_step per step; returns mean loss per reply token."""
    rng = random.Random(args.seed)
    adam = types.AdamParams(learning_rate=args.lr)
    losses = []
    for step in range(args.steps):
        batch = rng.sample(data, min(args.batch_size, len(data)))
        # Submit both before waiting: the client pipelines them and the server runs them in order.
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(adam)
        loss_sum = fb.result().metrics["loss:sum"]
        opt.result()
        n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        losses.append(loss_sum / n_tokens)
        print(f"step {step + 1:3d}  loss/token {losses[-1]:.4f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    with tx_client.ServiceClient(base_url=args.base_url, api_key=args.api_key) as sc:
        base_model = pick_base_model(sc, args.base_model)
        tc = sc.create_lora_training_client(base_model, rank=args.rank, seed=args.seed)
        tokenizer = tc.get_tokenizer()
        data = [render(tokenizer, q, a) for q, a in CONVERSATIONS]
        losses = train(tc, data, args)
        path = tc.save_state("sl-loop-final").result().path
        print(f"saved the adapter and optimizer state to {path}")
    return losses


if __name__ == "__main__":
    main()
