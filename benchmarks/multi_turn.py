"""Multi-turn sampling with and without the prefix cache: seconds per turn of a batch of episodes.

    uv run python benchmarks/multi_turn.py                          # tiny-qwen3 + small
    uv run python benchmarks/multi_turn.py --presets small --episodes 8 --turns 6
    uv run python benchmarks/multi_turn.py --turns 1 --opening 288 --system 256

An RL batch of ``--episodes`` conversations, sampled turn by turn as an agent loop does: turn
``k+1``'s prompt is turn ``k``'s prompt, its completion (``--completion`` tokens, ``stop=[]``)
and ``--observation`` new tokens; the first prompt has ``--opening`` tokens, of which the first
``--system`` are the same in every episode (a system prompt, few-shot examples). Each turn is
one :meth:`Sampler.sample` call with one request per episode. Two samplers on one engine, one
without a prefix cache (every turn prefills the whole conversation) and one with it (each turn
prefills what is new; a shared system prompt is prefilled once). Both first run a whole batch
of episodes untimed (compiling every shape), then a timed batch of other episodes with the same
lengths. The table shows each turn's prompt length, both times and their ratio; the cached
sampler's samples are checked against the plain one's (same tokens).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.host_memory import reexec_with_tuned_malloc
from tx_engine.sampler import Sampler, SampleRequestArrays
from tx_engine.testing import ensure_model


def episodes(sampler: Sampler, args: argparse.Namespace, seed: int) -> tuple[list[float], list[list[np.ndarray]]]:  # fmt: skip
    """Seconds per turn and every turn's sampled tokens, for one batch of episodes."""
    rng = np.random.default_rng(seed)
    vocab = sampler.engine.vocab_size
    system = rng.integers(5, vocab, args.system).astype(np.int32)
    prompts = [
        np.concatenate([system, rng.integers(5, vocab, args.opening - args.system)]).astype(
            np.int32
        )
        for _ in range(args.episodes)
    ]
    seconds, samples = [], []
    for turn in range(args.turns):
        requests = [
            SampleRequestArrays(p, max_tokens=args.completion, stop=[], seed=seed + 100 * turn + i)
            for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        results = sampler.sample(requests)
        seconds.append(time.perf_counter() - t0)
        tokens = [r.sequences[0].tokens for r in results]
        samples.append(tokens)
        prompts = [
            np.concatenate([p, s, rng.integers(5, vocab, args.observation).astype(np.int32)])
            for p, s in zip(prompts, tokens, strict=True)
        ]
    return seconds, samples


def bench(preset: str, args: argparse.Namespace) -> None:
    engine = TrainingEngine(ensure_model(preset), EngineConfig(max_lora_adapters=1))
    plain = Sampler(engine)
    cached = Sampler(engine, prefix_cache_tokens=args.cache_tokens)
    for sampler in (plain, cached):
        episodes(sampler, args, seed=1)  # warm-up: compiles every shape of the timed batch
    plain_s, plain_tokens = episodes(plain, args, seed=2)
    cached_s, cached_tokens = episodes(cached, args, seed=2)
    same = all(
        np.array_equal(a, b)
        for turn_a, turn_b in zip(plain_tokens, cached_tokens, strict=True)
        for a, b in zip(turn_a, turn_b, strict=True)
    )
    for turn in range(args.turns):
        prompt = args.opening + turn * (args.completion + args.observation)
        print(
            f"{preset:>11} {turn + 1:>5} {prompt:>7} {plain_s[turn]:>9.3f} {cached_s[turn]:>9.3f} "
            f"{plain_s[turn] / cached_s[turn]:>7.2f}x"
        )
    total_p, total_c = sum(plain_s), sum(cached_s)
    print(
        f"{preset:>11} {'all':>5} {'':>7} {total_p:>9.3f} {total_c:>9.3f} {total_p / total_c:>7.2f}x"
    )
    assert cached.prefix_cache is not None
    pc = cached.prefix_cache
    print(
        f"{'':>11} same samples: {same}; prefix cache: {pc.hits} hits, "
        f"{pc.reused_tokens} tokens reused, {len(pc)} entries, {pc.used_tokens} slots used"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny-qwen3,small")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--opening", type=int, default=128)
    parser.add_argument("--system", type=int, default=0, help="shared first opening tokens")
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--observation", type=int, default=32)
    parser.add_argument("--cache-tokens", type=int, default=8192)
    args = parser.parse_args()
    if not 0 <= args.system <= args.opening:
        parser.error("--system must be between 0 and --opening")
    print(
        f"{args.episodes} episodes x {args.turns} turns; opening {args.opening} tokens, the first "
        f"{args.system} shared; turn k+1 = turn k's prompt + "
        f"{args.completion} sampled + {args.observation} new tokens; seconds per turn (all "
        "episodes, one sample call)"
    )
    print(f"{'preset':>11} {'turn':>5} {'prompt':>7} {'plain s':>9} {'cached s':>9} {'speedup':>8}")
    for preset in args.presets.split(","):
        bench(preset, args)


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # measure the engine as the worker runs it: tx_engine.host_memory
    main()
