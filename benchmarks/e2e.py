"""End-to-end performance of tx as a user sees it: the official ``tinker`` SDK against a real server.

    uv run python benchmarks/e2e.py --quick                 # tiny + small presets, ~2-4 min on CPU
    uv run python benchmarks/e2e.py --presets small --json out.json

For each model preset the script builds the kit's checkpoint, starts ``python -m tx_server``
(API + supervised worker process, SQLite, a free port), and measures through the SDK only:

* **train tok/s** — pipelined ``forward_backward`` + ``optim_step`` steps on a ``B×T`` batch of
  real (unpadded) tokens, after one warm-up step that pays for compilation;
* **sample tok/s** — generated tokens per second of ``sample(num_samples=S, max_tokens=M)``
  (tokens of one request over the median request time);
* **group sample tok/s** — the same, sent as an RL group is by the cookbook: ``S`` concurrent
  requests of one sample each (distinct seeds) instead of one request of ``S`` samples; the
  worker gathers those that arrive within ``TX_SAMPLE_GATHER_SECONDS`` of each other into one
  sampler call, where they share the prompt's prefill;
* **round trips** — p50/p99 of a plain HTTP call (``RestClient.get_server_capabilities``: API
  only) and of two trivial *queued futures* (API → queue → worker → long-poll wake-up →
  result): a 1-token ``forward`` (the floor of every training call) and an ``optim_step`` with
  ``learning_rate=0`` (which also pays the worker's per-step recovery snapshot);
* **sampler refresh** — p50 of ``save_weights_and_get_sampling_client`` and a 1-token greedy
  sample from it: what each RL iteration pays to sample from its new weights (an export, a
  load into an adapter slot, the eviction of the previous sampler);
* **logprobs-128 latency** — p50 of ``compute_logprobs`` on a 128-token prompt, on the
  trained adapter's sampler and on the base model (what an RL loop's reference KL scores).
  The adapter's sampler has sent sample groups, so the worker waits out the gather window
  after each of its requests; the base model's sends one request at a time and does not;
* **training while another tenant samples** — p50 of one ``forward_backward`` + ``optim_step``
  of a tenant stepping back to back, alone and while a second tenant's request for ``S`` long
  rollouts (``R`` tokens) decodes; and that request's time alone and with the training beside
  it. The worker runs such training between decode steps, up to half the time
  (``TX_TRAINING_SHARE_WHILE_SAMPLING``);
* **joining a running batch** — round trip of a ``max_tokens``-token request of one tenant,
  alone and sent while another tenant's batch of two ``R``-token requests decodes with a free
  row (one of the two stopped early on a stop token), beside the time that batch still had to
  run: the request joins the free row instead of waiting for the batch; and sent while
  another tenant's lone ``R``-token request decodes, which has no free row: its batch grows a
  row for the request;
* **tenants ×N** — aggregate train tok/s of N processes, each its own API key (tenant),
  service client and LoRA adapter, stepping concurrently, for N = 1, 2, 4;
* **engine reference** — the same train and sample workloads on ``TrainingEngine`` /
  ``Sampler`` directly, with the server's engine settings, in a subprocess run before the server
  starts (so the two never share the device); the ``API / engine`` rows are what the REST
  path, the queue and the worker cost on top of the engine.

Every measurement is preceded by an untimed warm-up of the same shapes, so compile time is
excluded; the numbers are steady-state service throughput on whatever device the worker uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tinker
from tinker import types

from tx_engine.host_memory import reexec_with_tuned_malloc
from tx_engine.testing import ensure_model

RANK = 8
KEY = "tml-bench-e2e"


@dataclass(frozen=True)
class Plan:
    """Shapes and repetitions of one run (``--quick`` trades precision for time)."""

    batch: int
    seq: int
    train_steps: int
    samples: int
    max_tokens: int
    sample_reps: int
    rt_reps: int
    lp_reps: int
    tenant_steps: int
    rollout_tokens: int


QUICK = Plan(4, 64, 6, 4, 16, 5, 30, 3, 2, 256)  # 3 steps / 3 requests: API/engine rows swung ±15 %
FULL = Plan(8, 128, 6, 8, 32, 5, 100, 5, 3, 512)


@contextlib.contextmanager
def serve(model: str, tmp: Path) -> Iterator[str]:
    """``python -m tx_server`` on a free port (configured by ``TX_*``); stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "TX_PORT": str(port),
        "TX_DATABASE_URL": f"sqlite:///{tmp / 'tx.db'}",
        "TX_CHECKPOINT_ROOT": str(tmp / "checkpoints"),
        "TX_BASE_MODELS": json.dumps([model]),
        "TX_ENGINE__MAX_LORA_RANK": str(RANK),
        "TX_ENGINE__MAX_LORA_ADAPTERS": "16",
        "TX_ENGINE__MAX_SEQ_LEN": "512",
        "TX_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "tx_server"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tx_server exited with code {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("tx_server did not become healthy in 180 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def progress(message: str) -> None:
    """One line per finished measurement on stderr, so a slow run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def batch(plan: Plan, seed: int) -> list[types.Datum]:
    """``plan.batch`` random sequences of ``plan.seq`` tokens, every target weighted."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(plan.batch):
        tokens = rng.integers(10, 2000, plan.seq + 1)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(tokens[1:].astype(np.int64)),
                    "weights": types.TensorData.from_numpy(np.ones(plan.seq, np.float32)),
                },
            )
        )
    return out


def train_steps(tc: Any, data: list[types.Datum], steps: int) -> float:
    """Seconds for ``steps`` pipelined forward_backward + optim_step (all submitted up front)."""
    adam = types.AdamParams(learning_rate=1e-4)
    start = time.perf_counter()
    pending = [
        (tc.forward_backward(data, "cross_entropy"), tc.optim_step(adam)) for _ in range(steps)
    ]
    for fb, opt in pending:
        fb.result()
        opt.result()
    return time.perf_counter() - start


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def single_tenant(sc: Any, url: str, model: str, plan: Plan) -> dict[str, float]:
    """Train, sample, round-trip and logprob numbers of one client."""
    tc = sc.create_lora_training_client(model, rank=RANK, seed=0).result()
    data = batch(plan, 0)
    train_steps(tc, data, 1)  # warm-up: compiles forward_backward and optim_step
    seconds = train_steps(tc, data, plan.train_steps)
    result = {"train_tok_s": plan.train_steps * plan.batch * plan.seq / seconds}
    progress(f"train {result['train_tok_s']:.0f} tok/s")

    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(list(range(100, 132)))
    params = types.SamplingParams(max_tokens=plan.max_tokens, temperature=1.0, seed=0)
    sampled = [0]

    def sample() -> None:
        response = sampler.sample(prompt, num_samples=plan.samples, sampling_params=params).result()
        sampled[0] += sum(len(s.tokens) for s in response.sequences)

    sample()  # warm-up
    sampled[0] = 0
    spent = timed(sample, plan.sample_reps)
    # Per-request tokens over the median request: one request that shares the CPU with the
    # worker's background snapshot writes (cut right after training) does not set the number.
    result["sample_tok_s"] = sampled[0] / plan.sample_reps / statistics.median(spent)
    progress(f"sample {result['sample_tok_s']:.0f} tok/s")

    def sample_group() -> None:  # the cookbook's RL group: one request per rollout, one prompt
        futures = [
            sampler.sample(
                prompt, num_samples=1, sampling_params=params.model_copy(update={"seed": i})
            )
            for i in range(plan.samples)
        ]
        sampled[0] += sum(len(f.result().sequences[0].tokens) for f in futures)

    sample_group()  # warm-up
    sampled[0] = 0
    spent = timed(sample_group, plan.sample_reps)
    result["group_sample_tok_s"] = sampled[0] / plan.sample_reps / statistics.median(spent)
    progress(f"group sample {result['group_sample_tok_s']:.0f} tok/s")

    tiny = [batch(Plan(1, 1, 0, 0, 0, 0, 0, 0, 0, 0), 2)[0]]
    timed(lambda: tc.forward(tiny, "cross_entropy").result(), 2)
    result["fwd_rt_p50_ms"], result["fwd_rt_p99_ms"] = percentiles(
        timed(lambda: tc.forward(tiny, "cross_entropy").result(), plan.rt_reps)
    )
    zero = types.AdamParams(learning_rate=0.0)
    timed(lambda: tc.optim_step(zero).result(), 2)
    result["future_rt_p50_ms"], result["future_rt_p99_ms"] = percentiles(
        timed(lambda: tc.optim_step(zero).result(), plan.rt_reps)
    )
    rest = tinker.RestClient(base_url=url, api_key=KEY)
    timed(lambda: rest.get_server_capabilities().result(), 2)
    result["http_rt_p50_ms"], result["http_rt_p99_ms"] = percentiles(
        timed(lambda: rest.get_server_capabilities().result(), plan.rt_reps)
    )
    long_prompt = types.ModelInput.from_ints(list(range(200, 328)))
    base = sc.create_sampling_client(base_model=model)  # e.g. an RL reference model's KL
    for key, client in (("logprobs128_p50_ms", sampler), ("base_logprobs128_p50_ms", base)):
        # Steady state: until a new sampling client has sent a few requests one at a time,
        # the worker gathers after each (tx_server.worker.gathering.LoneSessions.LONE_AFTER).
        timed(lambda c=client: c.compute_logprobs(long_prompt).result(), 5)
        lp = timed(lambda c=client: c.compute_logprobs(long_prompt).result(), plan.lp_reps)
        result[key] = statistics.median(lp) * 1e3
    greedy_token = types.SamplingParams(max_tokens=1, temperature=0.0)

    def refresh() -> None:  # each RL iteration's new sampler: export, load into a slot, sample
        tc.save_weights_and_get_sampling_client().result().sample(prompt, 1, greedy_token).result()

    timed(refresh, 2)
    result["refresh_p50_ms"] = statistics.median(timed(refresh, plan.lp_reps + 4)) * 1e3
    progress(f"round trips and logprobs done: {result}")
    return result


def training_while_sampling(url: str, model: str, plan: Plan) -> dict[str, float]:
    """Train-step latency of one tenant alone and during another tenant's long sample request,
    and that request's time alone and with the training beside it."""
    with (
        tinker.ServiceClient(base_url=url, api_key=f"{KEY}-trainer") as trainer,
        tinker.ServiceClient(base_url=url, api_key=f"{KEY}-sampler") as other,
    ):
        tc = trainer.create_lora_training_client(model, rank=RANK, seed=0).result()
        data = batch(plan, 3)
        sampler = other.create_sampling_client(base_model=model).result()
        prompt = types.ModelInput.from_ints(list(range(100, 132)))
        params = types.SamplingParams(max_tokens=plan.rollout_tokens, seed=0, stop=[])

        def sample() -> Any:
            return sampler.sample(prompt, num_samples=plan.samples, sampling_params=params)

        step = [0.0]

        def train_step() -> None:
            step[0] = train_steps(tc, data, 1)

        timed(train_step, 2)  # warm-up: compiles
        result = {"step_alone_p50_ms": statistics.median(timed(train_step, 5)) * 1e3}
        sample().result()  # warm-up
        result["rollouts_alone_s"] = statistics.median(timed(lambda: sample().result(), 2))
        start = time.perf_counter()
        pending = sample()
        during: list[float] = []
        while not pending.future().done():
            during.append(train_steps(tc, data, 1))
        pending.result()
        result["rollouts_with_training_s"] = time.perf_counter() - start
        result["step_during_p50_ms"] = statistics.median(during) * 1e3 if during else float("nan")
    progress(f"training while sampling: {result}")
    return result


def joining_a_running_batch(url: str, model: str, plan: Plan) -> dict[str, float]:
    """A short request's round trip alone, while another tenant's batch has a free row, and
    while another tenant's lone long request decodes (a 1-row batch, which grows for it)."""
    with (
        tinker.ServiceClient(base_url=url, api_key=f"{KEY}-batch") as first,
        tinker.ServiceClient(base_url=url, api_key=f"{KEY}-joiner") as second,
    ):
        batch = first.create_sampling_client(base_model=model).result()
        joiner = second.create_sampling_client(base_model=model).result()
        prompt = types.ModelInput.from_ints(list(range(100, 132)))
        short = types.SamplingParams(max_tokens=plan.max_tokens, seed=1, stop=[])
        greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        stop_token = batch.sample(prompt, 1, greedy).result().sequences[0].tokens[3]
        long = types.SamplingParams(max_tokens=plan.rollout_tokens, seed=2, stop=[])
        stopping = types.SamplingParams(
            max_tokens=plan.rollout_tokens, temperature=0.0, stop=[stop_token]
        )
        alone = timed(lambda: joiner.sample(prompt, 1, short).result(), 3)[1:]

        def join(start: Any) -> tuple[float, float]:
            """Medians (ms) of the short request's round trip, and of the time the batch
            ``start()`` sent (its long request's future) still ran after it was sent."""
            answered, ended = [], []
            # The first rounds compile the joined admission, and whatever batch size the
            # request finds (a batch may have shrunk yet or not: that depends on timing).
            for _ in range(5):
                long_future = start()
                sent = time.perf_counter()
                joiner.sample(prompt, 1, short).result()
                answered.append(time.perf_counter() - sent)
                long_future.result()
                ended.append(time.perf_counter() - sent)
            return statistics.median(answered[2:]) * 1e3, statistics.median(ended[2:]) * 1e3

        def with_a_free_row() -> Any:
            long_future, stop_future = (batch.sample(prompt, 1, p) for p in (long, stopping))
            stop_future.result()
            return long_future

        long_alone = statistics.median(timed(lambda: batch.sample(prompt, 1, long).result(), 2))

        def alone_in_its_batch() -> Any:
            long_future = batch.sample(prompt, 1, long)
            time.sleep(long_alone / 4)  # past the gather window and the prefill: it decodes
            return long_future

        result = {"short_alone_ms": statistics.median(alone) * 1e3}
        result["short_joined_ms"], result["batch_left_ms"] = join(with_a_free_row)
        result["short_grown_ms"], result["lone_left_ms"] = join(alone_in_its_batch)
    progress(f"joining a running batch: {result}")
    return result


def tenants(url: str, model: str, plan: Plan, n: int) -> float:
    """Aggregate train tok/s of ``n`` tenants stepping at once, each its own process.

    Separate processes, as real tenants are: SDK clients in threads of one process would
    measure the client's GIL, not the server. Each tenant process creates its adapter, warms
    up, then steps on every ``go`` from this process; the aggregate is the tokens of all of
    them over the span from the first start to the last end (the second, warm, round).
    """
    # The worker fuses concurrent tenants' passes into one batch of k·B rows (k ≤ n, padded to
    # a bucket) in whatever combination they arrive; compile each size before timing.
    with tinker.ServiceClient(base_url=url, api_key=f"{KEY}-warmup{n}") as sc:
        tc = sc.create_lora_training_client(model, rank=RANK, seed=0).result()
        for k in range(1, n + 1):
            train_steps(tc, batch(plan, 0) * k, 1)
    argv = [sys.executable, __file__, "--tenant", url, model, str(n)]
    quick = ["--quick"] if plan == QUICK else []
    procs = [
        subprocess.Popen(
            [*argv, str(i), *quick], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for i in range(n)
    ]
    try:
        for proc in procs:
            _expect_line(proc, "ready")
        spans: list[list[float]] = []
        for _ in range(2):  # the first round is a warm-up of the concurrent shapes
            for proc in procs:
                _send_line(proc, "go")
            spans = [json.loads(_expect_line(proc)) for proc in procs]
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # end of input: the tenant closes its session and exits
        for proc in procs:
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"tenant process exited with {proc.returncode}")
    seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    return n * plan.tenant_steps * plan.batch * plan.seq / seconds


def _send_line(proc: subprocess.Popen[str], line: str) -> None:
    if proc.stdin is None:
        raise RuntimeError("tenant process has no stdin")
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _expect_line(proc: subprocess.Popen[str], want: str | None = None) -> str:
    """The tenant process's next stdout line (``want`` it to be exactly that)."""
    line = proc.stdout.readline().strip() if proc.stdout is not None else ""
    if not line or (want is not None and line != want):
        raise RuntimeError(f"tenant process said {line!r}, expected {want or 'a result'!r}")
    return line


def tenant_process(url: str, model: str, n: int, index: int, plan: Plan) -> None:
    """One tenant of :func:`tenants`: ``ready``, then a ``[start, end]`` line per ``go``."""
    with tinker.ServiceClient(base_url=url, api_key=f"{KEY}-tenant{n}-{index}") as sc:
        tc = sc.create_lora_training_client(model, rank=RANK, seed=index).result()
        data = batch(plan, 1 + index)
        train_steps(tc, data, 1)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            start = time.time()
            train_steps(tc, data, plan.tenant_steps)
            print(json.dumps([start, time.time()]), flush=True)
        sc.close("success").result()  # also stops the session's heartbeat


def engine_reference(preset: str, plan: Plan) -> dict[str, float]:
    """Train and sample tok/s of the same workloads on the engine itself (no server)."""
    from tx_engine.config import EngineConfig
    from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine
    from tx_engine.sampler import Sampler, SampleRequestArrays
    from tx_server.settings import EngineSettings

    settings = EngineSettings(max_lora_rank=RANK, max_lora_adapters=16, max_seq_len=512)
    engine = TrainingEngine(ensure_model(preset), EngineConfig(**settings.engine_config_kwargs()))
    slot = engine.create_adapter(rank=RANK, seed=0)
    rows = [
        DatumArrays(
            np.asarray(d.model_input.to_ints()),
            {k: d.loss_fn_inputs[k].to_numpy() for k in ("target_tokens", "weights")},
        )
        for d in batch(plan, 0)
    ]

    def train(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            engine.forward_backward([AdapterBatch(slot, rows)])
            engine.optim_step(slot, AdamParams(learning_rate=1e-4))
        return time.perf_counter() - start

    train(1)
    result = {"train_tok_s": plan.train_steps * plan.batch * plan.seq / train(plan.train_steps)}
    sampler = Sampler(
        engine,
        max_cache_tokens=settings.sample_tokens_per_batch,
        max_batch=64,
        decode_chunk=settings.sample_decode_chunk,
    )
    request = SampleRequestArrays(
        np.arange(100, 132, dtype=np.int32),
        num_samples=plan.samples,
        max_tokens=plan.max_tokens,
        seed=0,
        adapter=slot,
    )
    sampler.sample([request])  # warm-up
    spent, sampled = [], 0
    for _ in range(plan.sample_reps):
        start = time.perf_counter()
        (out,) = sampler.sample([request])
        spent.append(time.perf_counter() - start)
        sampled += sum(len(s.tokens) for s in out.sequences)
    result["sample_tok_s"] = sampled / plan.sample_reps / statistics.median(spent)
    return result


def run_engine_reference(preset: str, plan: Plan) -> dict[str, float]:
    """:func:`engine_reference` in a subprocess (its device memory is freed when it exits)."""
    argv = [sys.executable, __file__, "--engine-reference", preset]
    out = subprocess.run(
        argv + (["--quick"] if plan == QUICK else []), capture_output=True, text=True, check=True
    )
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    progress(f"{preset}: engine reference {ref}")
    return {f"engine_{k}": v for k, v in ref.items()}


def bench_preset(preset: str, plan: Plan) -> dict[str, float]:
    model = str(ensure_model(preset))
    reference = run_engine_reference(preset, plan)
    progress(f"{preset}: serving {model}")
    with tempfile.TemporaryDirectory(prefix="tx-bench-e2e-") as tmp, serve(model, Path(tmp)) as url:
        with tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
            result = single_tenant(sc, url, model, plan)
        result |= training_while_sampling(url, model, plan)
        result |= joining_a_running_batch(url, model, plan)
        for n in (1, 2, 4):
            result[f"tenants{n}_tok_s"] = tenants(url, model, plan, n)
            progress(f"{n} tenants {result[f'tenants{n}_tok_s']:.0f} tok/s")
    result |= reference
    result["train_vs_engine"] = result["train_tok_s"] / result["engine_train_tok_s"]
    result["sample_vs_engine"] = result["sample_tok_s"] / result["engine_sample_tok_s"]
    result["tenants4_vs_1"] = result["tenants4_tok_s"] / result["tenants1_tok_s"]
    return result


ROWS = [
    ("train_tok_s", "train tok/s (fwd_bwd+optim, {batch}x{seq})", "{:.0f}"),
    ("sample_tok_s", "sample tok/s ({samples} samples x {max_tokens} tok)", "{:.0f}"),
    ("group_sample_tok_s", "sample tok/s ({samples} requests x 1 sample, one prompt)", "{:.0f}"),
    ("fwd_rt_p50_ms", "queued future rt p50 ms (forward, 1 token)", "{:.1f}"),
    ("fwd_rt_p99_ms", "queued future rt p99 ms (forward, 1 token)", "{:.1f}"),
    ("future_rt_p50_ms", "queued future rt p50 ms (optim_step lr=0)", "{:.1f}"),
    ("future_rt_p99_ms", "queued future rt p99 ms (optim_step lr=0)", "{:.1f}"),
    ("http_rt_p50_ms", "plain HTTP rt p50 ms (get_server_capabilities)", "{:.1f}"),
    ("http_rt_p99_ms", "plain HTTP rt p99 ms (get_server_capabilities)", "{:.1f}"),
    ("logprobs128_p50_ms", "compute_logprobs 128 tok p50 ms", "{:.1f}"),
    ("base_logprobs128_p50_ms", "compute_logprobs 128 tok p50 ms, base model", "{:.1f}"),
    ("refresh_p50_ms", "save_weights_and_get_sampling_client + 1 tok p50 ms", "{:.0f}"),
    ("step_alone_p50_ms", "train step p50 ms, alone", "{:.0f}"),
    (
        "step_during_p50_ms",
        "train step p50 ms, while another tenant samples {samples}x{rollout_tokens} tok",
        "{:.0f}",
    ),
    ("rollouts_alone_s", "that sample request s, alone", "{:.2f}"),
    ("rollouts_with_training_s", "that sample request s, with the training beside it", "{:.2f}"),
    ("short_alone_ms", "sample rt ms, 1 x {max_tokens} tok, alone", "{:.0f}"),
    ("short_joined_ms", "sample rt ms, same, joining another tenant's batch", "{:.0f}"),
    ("batch_left_ms", "that batch's time left when the request was sent, ms", "{:.0f}"),
    ("short_grown_ms", "sample rt ms, same, joining another tenant's lone request", "{:.0f}"),
    ("lone_left_ms", "that request's time left when the request was sent, ms", "{:.0f}"),
    ("tenants1_tok_s", "1 tenant  aggregate train tok/s", "{:.0f}"),
    ("tenants2_tok_s", "2 tenants aggregate train tok/s", "{:.0f}"),
    ("tenants4_tok_s", "4 tenants aggregate train tok/s", "{:.0f}"),
    ("tenants4_vs_1", "4 tenants / 1 tenant", "{:.2f}"),
    ("engine_train_tok_s", "engine train tok/s (same shape, no server)", "{:.0f}"),
    ("train_vs_engine", "API / engine train throughput", "{:.2f}"),
    ("engine_sample_tok_s", "engine sample tok/s (same request, no server)", "{:.0f}"),
    ("sample_vs_engine", "API / engine sample throughput", "{:.2f}"),
]


def table(results: dict[str, dict[str, float]], plan: Plan) -> str:
    labels = [label.format(**asdict(plan)) for _, label, _ in ROWS]
    width = max(len(x) for x in labels)
    head = f"| {'metric':<{width}} | " + " | ".join(f"{p:>12}" for p in results) + " |"
    lines = [head, "|" + "-" * (width + 2) + "|" + "|".join("-" * 14 for _ in results) + "|"]
    for (key, _, fmt), label in zip(ROWS, labels, strict=True):
        cells = " | ".join(f"{fmt.format(r[key]):>12}" for r in results.values())
        lines.append(f"| {label:<{width}} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny-qwen3,small", help="comma-separated presets")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--engine-reference", metavar="PRESET", help=argparse.SUPPRESS)
    parser.add_argument("--tenant", nargs=4, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.tenant:  # a subprocess of tenants(): URL MODEL N INDEX
        url, model, n, index = args.tenant
        tenant_process(url, model, int(n), int(index), plan)
        return {}
    if args.engine_reference:  # the subprocess of run_engine_reference: one JSON line
        print(json.dumps(engine_reference(args.engine_reference, plan)))
        return {}
    started = time.perf_counter()
    results = {p: bench_preset(p, plan) for p in args.presets.split(",")}
    print(table(results, plan))
    print(
        f"\n{'quick' if args.quick else 'full'} plan {plan}; {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"plan": asdict(plan), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # measure the engine as the worker runs it: tx_engine.host_memory
    main()
