"""What a new shape costs the rows that are decoding: the longest pause of a running batch when
a request joins it with a prompt of a length no admission has used yet.

    uv run python benchmarks/compile_stall.py                  # tiny-qwen3 + small
    uv run python benchmarks/compile_stall.py --presets small

Two long requests decode together (2 rows); at decode step 5 a third joins with a 20-token
prompt (bucket 32, where theirs are in 16), so the batch grows to 4 rows and admits it: a new
decode program, a new admission program. Every other program was compiled by two identical
calls without the joiner first. Each case runs in a fresh process (nothing compiled; no
persistent compilation cache), with ``compile_ahead`` off (the programs compile in the decode
loop) and on (on a background thread while the two rows keep decoding;
:mod:`tx_engine.step.ahead`).

Columns: the process's first request (4 tokens; everything compiles in place, nothing being
live, so it is the same either way), the usual decode step (median time between two steps), the longest
time between two steps after the join (the stall every running row sees), and the joiner's
wait from its join to its result. The joiner's outputs are the same either way (the tests check that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)
TOKENS = {"tiny-qwen3": 1500, "small": 250}  # enough steps to outlast the compiles


def measure(preset: str, ahead: bool) -> dict[str, float]:
    """One case, in this process: see the module docstring."""
    from tx_engine.config import EngineConfig
    from tx_engine.engine import TrainingEngine
    from tx_engine.sampler import Sampler, SampleRequestArrays
    from tx_engine.testing import ensure_model

    engine = TrainingEngine(ensure_model(preset), EngineConfig(max_lora_adapters=1))
    tokens = TOKENS[preset]
    cache = 1 << (len(PROMPT) + tokens - 1).bit_length()
    # One step per dispatch: the interruption below is asked before each, and times steps.
    sampler = Sampler(
        engine, max_cache_tokens=4 * cache, max_batch=4, compile_ahead=ahead, decode_chunk=1
    )
    first = [SampleRequestArrays(PROMPT, max_tokens=tokens, seed=i, stop=[]) for i in range(2)]
    joiner = SampleRequestArrays(np.arange(100, 120, dtype=np.int32), max_tokens=8, seed=3, stop=[])
    start = time.perf_counter()
    sampler.sample([SampleRequestArrays(PROMPT, max_tokens=4, seed=0, stop=[])])
    cold = time.perf_counter() - start
    for _ in range(2):
        sampler.sample(first)

    class JoinAtStep5:
        def __init__(self) -> None:
            self.times: list[float] = []
            self.joined = self.done = 0.0

        def due(self) -> bool:
            self.times.append(time.perf_counter())
            return len(self.times) == 5

        def run(self) -> None:
            self.joined = time.perf_counter()
            sampler.join(joiner)

    probe = JoinAtStep5()

    def ready(pairs: list[tuple[int, object]]) -> None:
        if any(i == 2 for i, _ in pairs):
            probe.done = time.perf_counter()

    sampler.sample(first, on_ready=ready, interruption=probe)
    gaps = np.diff(probe.times)
    after = gaps[4:]  # from the step after the join
    return {
        "cold_s": cold,
        "step_ms": 1e3 * statistics.median(gaps),
        "stall_ms": 1e3 * float(after.max()),
        "joiner_ms": 1e3 * (probe.done - probe.joined),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(TOKENS), choices=list(TOKENS))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # preset:on|off, in a child process
    args = parser.parse_args()
    if args.case:
        preset, mode = args.case.split(":")
        print(json.dumps(measure(preset, mode == "on")))
        return
    rows = []
    for preset in args.presets:
        for mode in ("off", "on"):
            out = subprocess.run(
                [sys.executable, __file__, "--case", f"{preset}:{mode}"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((preset, mode, got))
            print(f"{preset} compile_ahead={mode}: {got}", file=sys.stderr, flush=True)
    print(f"| {'preset':<10} | {'compile_ahead':<13} | {'first request s':>15} | "
          f"{'decode step ms':>14} | {'longest pause ms':>16} | {'joiner wait ms':>14} |")  # fmt: skip
    print(f"|{'-' * 12}|{'-' * 15}|{'-' * 17}|{'-' * 16}|{'-' * 18}|{'-' * 16}|")
    for preset, mode, got in rows:
        print(f"| {preset:<10} | {mode:<13} | {got['cold_s']:>15.2f} | {got['step_ms']:>14.1f} | "
              f"{got['stall_ms']:>16.0f} | {got['joiner_ms']:>14.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
