"""Training throughput of tx-engine: forward_backward + optim_step tokens/s and MFU.

    uv run python benchmarks/engine_train.py                     # tiny + small, default shapes
    uv run python benchmarks/engine_train.py --presets small --shapes 8x512 --tenants 1,4
    uv run python benchmarks/engine_train.py --presets small --max-ranks 8,64   # rank buckets

Every row trains rank-8 tenants; ``--max-ranks`` builds one engine per ``max_lora_rank``, so the
rows at ``R_max`` 8 and 64 show what a rank-8 tenant pays for a larger maximum rank (with rank
buckets: about nothing in compute; the padded factors still take memory; ``optim s`` is the
optimizer-step part of ``s/step``, which used to grow with ``R_max``). ``peak RSS`` is the
process's high-water mark so far (``ru_maxrss``), so it only grows down the table. Engines use
the default ``tokens_per_micro_batch`` (override with ``--tokens-per-micro-batch``), as a server
would: a step larger than it runs as several micro-batches whose gradients are summed.

MFU is measured against a matmul peak timed *in the same run* on the same device and dtype
(a large ``jnp.dot``), so the number is honest on any machine, CPU included, rather than
relative to a datasheet figure the run never reaches.

FLOPs per token follow the usual accounting for LoRA training: the frozen base needs the
forward (2N) and the activation gradients (2N) but no weight gradients, so ``4 × N`` where
``N`` is the number of *matmul* parameters a token passes through (attention and MLP
projections — the active experts for MoE — plus ``lm_head``; the embedding lookup is not a
matmul). Attention scores add ``3 × 4 × T × H·Dh`` per layer per token (forward QKᵀ and AV,
backward twice that; full, not causal-halved, T = padded length). LoRA adds
``6 × (D_in + D_out) × R`` per adapted projection. Tokens are real (unpadded) tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tx_engine.config import EngineConfig
from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
from tx_engine.host_memory import reexec_with_tuned_malloc
from tx_engine.testing import ensure_model

RANK = 8


def matmul_peak(dtype: str, n: int = 2048, iters: int = 10) -> float:
    """Best-of FLOP/s of an ``n×n`` matmul chain: the achievable dense peak of this device."""
    a = jnp.ones((n, n), dtype) * 0.001
    f = jax.jit(lambda x: x @ a)
    x = f(a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(cfg: dict[str, Any], seq_len: int) -> float:
    """Training FLOPs per token for LoRA fine-tuning (see the module docstring)."""
    d, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    h, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // h
    attn_params = d * h * hd * 2 + d * k * hd * 2
    lora_dims = (d + h * hd) * 2 + (d + k * hd) * 2  # Σ (d_in + d_out) over q, o, k, v
    if cfg.get("num_experts"):
        f, top = cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
        mlp_params = top * 3 * d * f + d * cfg["num_experts"]
        lora_dims += top * 3 * (d + f)
    else:
        f = cfg["intermediate_size"]
        mlp_params = 3 * d * f
        lora_dims += 3 * (d + f)
    n_matmul = layers * (attn_params + mlp_params) + d * v
    attention = 3 * 4 * seq_len * h * hd * layers
    lora_flops = 6 * RANK * (layers * lora_dims + d + v)
    return 4 * n_matmul + attention + lora_flops


def make_groups(slots: list[int], batch: int, length: int, seed: int) -> list[AdapterBatch]:
    rng = np.random.default_rng(seed)
    rows = [
        DatumArrays(rng.integers(5, 2000, length), {"target_tokens": rng.integers(5, 2000, length)})
        for _ in range(batch)
    ]
    per = -(-batch // len(slots))
    return [AdapterBatch(s, rows[i * per : (i + 1) * per]) for i, s in enumerate(slots)]


def bench_one(
    engine: TrainingEngine, tenants: int, batch: int, length: int, iters: int
) -> tuple[float, float]:
    """Median seconds per forward_backward + optim_step (all tenants), after two untimed steps,
    and the median of the optim_step part alone (what a larger ``max_lora_rank`` used to cost).

    The first untimed step compiles what this row needs: the tenant count changes programs too
    (gradients and AdamW run on the batch's slots only, the optimizer on the allocated ones).
    """
    slots = [engine.create_adapter(rank=RANK, seed=i) for i in range(tenants)]
    groups = make_groups(slots, batch, length, seed=0)
    params = {s: AdamParams(1e-4) for s in slots}
    for _ in range(2):  # the second step is still slow while the heap grows (host_memory)
        engine.forward_backward(groups)
        engine.optim_steps(params)
    times, optim_times = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        engine.forward_backward(groups)  # results are fetched to host: synchronous
        t1 = time.perf_counter()
        jax.block_until_ready(jax.tree.leaves(engine.optim_steps(params)))
        times.append(time.perf_counter() - t0)
        optim_times.append(time.perf_counter() - t1)
    for s in slots:
        engine.free_adapter(s)
    return float(np.median(times)), float(np.median(optim_times))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny-qwen3,small")
    parser.add_argument("--shapes", default="4x128,8x512", help="BxL,... rows × tokens")
    parser.add_argument("--tenants", default="1,4")
    parser.add_argument("--max-ranks", default="8,64", help="max_lora_rank of each engine")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per row (median)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--tokens-per-micro-batch",
        type=int,
        default=EngineConfig().tokens_per_micro_batch,
        help="EngineConfig.tokens_per_micro_batch (default: the engine's); larger shapes are "
        "split into micro-batches inside forward_backward",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    tenants = [int(t) for t in args.tenants.split(",")]
    max_ranks = [int(r) for r in args.max_ranks.split(",")]
    peak = matmul_peak(args.dtype)
    print(
        f"device: {jax.devices()[0].device_kind}  matmul peak ({args.dtype}): "
        f"{peak / 1e9:.1f} GFLOP/s"
    )
    header = (
        f"{'preset':<12}{'R_max':>6}{'B':>4}{'L':>6}{'tenants':>9}{'s/step':>9}{'optim s':>9}"
        f"{'tokens/s':>11}"
        f"{'MFU':>8}{'peak RSS MB':>13}"
    )
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            model_dir = ensure_model(preset, Path(tmp))
            cfg = json.loads((model_dir / "config.json").read_text())
            for max_rank in max_ranks:
                engine = TrainingEngine(
                    model_dir,
                    EngineConfig(
                        max_lora_adapters=max(tenants),
                        max_lora_rank=max_rank,
                        dtype=args.dtype,
                        tokens_per_micro_batch=args.tokens_per_micro_batch,
                    ),
                )
                for batch, length in shapes:
                    for n in tenants:
                        sec, optim_sec = bench_one(engine, n, batch, length, args.iters)
                        tps = batch * length / sec
                        row = {
                            "preset": preset,
                            "max_lora_rank": max_rank,
                            "B": batch,
                            "L": length,
                            "tenants": n,
                            "s_per_step": sec,
                            "optim_s": optim_sec,
                            "tokens_per_s": tps,
                            "mfu": tps * flops_per_token(cfg, length) / peak,
                            "peak_rss_mb": peak_rss_mb(),
                        }
                        rows.append(row)
                        print(_fmt(row), flush=True)
                del engine
    # Re-measure at the end and keep the best: a busy machine lowers the peak, and an
    # underestimated peak would inflate every MFU above.
    peak_end = matmul_peak(args.dtype)
    if peak_end > peak * 1.05:
        print(f"matmul peak re-measured at {peak_end / 1e9:.1f} GFLOP/s; MFU with it:")
        for row in rows:
            row["mfu"] *= peak / peak_end
            print(
                f"{row['preset']:<12}{row['max_lora_rank']:>6}{row['B']:>4}{row['L']:>6}"
                f"{row['tenants']:>9}{row['mfu']:>8.1%}"
            )
        peak = peak_end
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=2))


def _fmt(row: dict[str, Any]) -> str:
    return (
        f"{row['preset']:<12}{row['max_lora_rank']:>6}{row['B']:>4}{row['L']:>6}"
        f"{row['tenants']:>9}{row['s_per_step']:>9.3f}{row['optim_s']:>9.3f}"
        f"{row['tokens_per_s']:>11.0f}"
        f"{row['mfu']:>8.1%}{row['peak_rss_mb']:>13.0f}"
    )


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # measure the engine as the worker runs it: tx_engine.host_memory
    main()
