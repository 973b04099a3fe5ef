"""Reinforcement learning through the Tinker API with tx-client: group sampling + importance sampling.

A toy task with a reward anyone can verify: the model should answer in plain English words.
The reward of a completion is the fraction of its tokens that are a space followed by ASCII
letters (" cat", " Paris"). Each step samples a group of completions per prompt from the
current weights, scores them, and uses ``reward - group mean`` as the advantage of every
completion token (GRPO-style), with the sampler's own logprobs as ``logprobs`` so the
``importance_sampling`` loss corrects for the sampler/learner mismatch.

    TX_BASE_URL=http://127.0.0.1:8000 uv run python examples/rl_loop.py --steps 10
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import tx_client
from tx_client import types

PROMPTS = [
    "Describe your morning.",
    "Name some animals.",
    "What do you like to eat?",
    "Tell me about the weather.",
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
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--num-prompts", type=int, default=len(PROMPTS), help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="adapter init and sampling seed")
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


def reward(tokenizer: Any, tokens: list[int]) -> float:
    """The verifier: the share of tokens that decode to ' ' + ASCII letters (a whole word)."""
    words = 0
    for token in tokens:
        text = tokenizer.decode([token])
        words += len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
    return words / max(1, len(tokens))


def encode_prompt(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def rl_datum(prompt: list[int], seq: Any, advantage: float) -> types.Datum:
    """Prompt + completion; only completion tokens carry an advantage (prompt rows are 0)."""
    n_prompt, completion = len(prompt) - 1, list(seq.tokens)
    tokens = prompt + completion
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "logprobs": types.TensorData(
                data=[0.0] * n_prompt + list(seq.logprobs), dtype="float32"
            ),
            "advantages": types.TensorData(
                data=[0.0] * n_prompt + [advantage] * len(completion), dtype="float32"
            ),
        },
    )


def rl_step(tc: Any, tokenizer: Any, prompts: list[list[int]], step: int, args: Any) -> float:
    """Sample groups from the current weights, score them, train once; returns the mean reward."""
    sampler = tc.save_weights_and_get_sampling_client()
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(prompt),
            num_samples=args.group_size,
            sampling_params=types.SamplingParams(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed * 100_000 + step * 100 + i,  # reproducible runs
            ),
        )
        for i, prompt in enumerate(prompts)
    ]
    data, all_rewards = [], []
    for prompt, future in zip(prompts, futures, strict=True):
        group = future.result().sequences
        rewards = [reward(tokenizer, list(seq.tokens)) for seq in group]
        all_rewards += rewards
        mean = sum(rewards) / len(rewards)
        # Zero advantage means zero gradient: skip those (a uniform group drops out whole).
        pairs = zip(group, rewards, strict=True)
        data += [rl_datum(prompt, seq, r - mean) for seq, r in pairs if r != mean]
    if data:
        fb = tc.forward_backward(data, "importance_sampling")
        opt = tc.optim_step(types.AdamParams(learning_rate=args.lr))
        fb.result()
        opt.result()
    return sum(all_rewards) / len(all_rewards)


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    with tx_client.ServiceClient(base_url=args.base_url, api_key=args.api_key) as sc:
        base_model = pick_base_model(sc, args.base_model)
        tc = sc.create_lora_training_client(base_model, rank=args.rank, seed=args.seed)
        tokenizer = tc.get_tokenizer()
        prompts = [encode_prompt(tokenizer, q) for q in PROMPTS[: args.num_prompts]]
        rewards = []
        for step in range(args.steps):
            rewards.append(rl_step(tc, tokenizer, prompts, step, args))
            print(f"step {step + 1:3d}  mean reward {rewards[-1]:.3f}", flush=True)
    return rewards


if __name__ == "__main__":
    main()
