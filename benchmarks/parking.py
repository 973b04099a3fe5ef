"""What parking costs: training steps of runs taking turns on fewer adapter slots than runs.

    uv run python benchmarks/parking.py                      # tiny-qwen3 + small
    uv run python benchmarks/parking.py --presets small --rounds 5

A server (API + worker, in this process) with ``max_lora_adapters = --slots``; ``--slots + 1``
runs (each its own service client, as tenants are) step in turn — ``forward_backward`` then
``optim_step``, each waited for — so that every step of a run finds it parked and parks
another (:mod:`tx_server.worker.engines`): a snapshot write and a restore per step. Beside it,
``--slots`` runs taking turns the same way, which never park. The table shows the p50 round
trip of one step (both calls) in each case, and the difference: what a tenant pays for a
slot it does not hold. Every shape is stepped once untimed first, so compile time is excluded.

Then the ``--slots + 1`` runs step *together*: each submits ``forward_backward`` and
``optim_step`` without waiting, then all wait (an RL group of tenants). Columns: the p50 time
of such an iteration, and how many runs were parked per iteration (from the worker's log).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import tinker
from tinker import types

from tx_engine.testing import ensure_model
from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, make_settings, run_server
from tx_server.worker.loop import worker_thread

TOKENS = 128
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints(list(range(5, 5 + TOKENS))),
    loss_fn_inputs={
        "target_tokens": types.TensorData(data=list(range(6, 6 + TOKENS)), dtype="int64")
    },
)


def step_times(url: str, model: str, runs: int, rounds: int) -> list[float]:
    """Seconds of each step after the first round, ``runs`` runs stepping in turn."""
    services = [tinker.ServiceClient(base_url=url, api_key=API_KEY) for _ in range(runs)]
    try:
        clients = [s.create_lora_training_client(model, rank=8, seed=i).result(timeout=600) for i, s in enumerate(services)]  # fmt: skip
        adam = types.AdamParams(learning_rate=1e-4)
        seconds = []
        for r in range(rounds + 1):
            for tc in clients:
                t0 = time.perf_counter()
                tc.forward_backward([DATUM], "cross_entropy").result(timeout=600)
                tc.optim_step(adam).result(timeout=600)
                if r:
                    seconds.append(time.perf_counter() - t0)
        return seconds
    finally:
        for s in services:
            s.holder.close()


def together(url: str, model: str, runs: int, rounds: int) -> tuple[float, float]:
    """p50 seconds of an iteration of ``runs`` runs stepping together, and parks per
    iteration, after one untimed iteration."""
    parks: list[str] = []

    class Parks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("parked model"):
                parks.append(record.getMessage())

    handler, engines_log = Parks(), logging.getLogger("tx_server.worker.engines")
    engines_log.addHandler(handler)
    engines_log.setLevel(logging.INFO)
    services = [tinker.ServiceClient(base_url=url, api_key=API_KEY) for _ in range(runs)]
    try:
        clients = [s.create_lora_training_client(model, rank=8, seed=i).result(timeout=600) for i, s in enumerate(services)]  # fmt: skip
        seconds = []
        for r in range(rounds + 1):
            if r == 1:
                parks.clear()
            t0 = time.perf_counter()
            futures = []
            for tc in clients:
                futures.append(tc.forward_backward([DATUM], "cross_entropy"))
                futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-4)))
            for future in futures:
                future.result(timeout=600)
            if r:
                seconds.append(time.perf_counter() - t0)
        return statistics.median(seconds), len(parks) / rounds
    finally:
        engines_log.removeHandler(handler)
        for s in services:
            s.holder.close()


def bench(preset: str, slots: int, rounds: int) -> tuple[float, float, float, float]:
    model = str(ensure_model(preset))
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=slots, max_seq_len=256)
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), base_models=[model], engine=engine)
        with run_server(settings) as server, worker_thread(settings):
            held = statistics.median(step_times(server.url, model, slots, rounds))
            parked = statistics.median(step_times(server.url, model, slots + 1, rounds))
            iteration, parks = together(server.url, model, slots + 1, 2 * rounds)
    return held, parked, iteration, parks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-qwen3", "small"])
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rows = [(p, *bench(p, args.slots, args.rounds)) for p in args.presets]
    print(f"{'preset':>12} {'held ms':>9} {'parked ms':>10} {'cost ms':>8} "
          f"{'together ms':>12} {'parks/iter':>11}")  # fmt: skip
    for preset, held, parked, iteration, parks in rows:
        print(f"{preset:>12} {held * 1e3:9.1f} {parked * 1e3:10.1f} {(parked - held) * 1e3:8.1f} "
              f"{iteration * 1e3:12.1f} {parks:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
