"""Compiling ahead: the program table compiles each program once per signature, ahead on a
background thread or at its first call, and calls it as jit would have; a sampling run uses it
to keep its live rows decoding while a new admission compiles."""

from __future__ import annotations

import gc
import threading
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_engine.config import EngineConfig
from tx_engine.engine import TrainingEngine
from tx_engine.sampler import Sampler, SampleRequestArrays
from tx_engine.sampling import continuous
from tx_engine.step.ahead import ProgramTable
from tx_engine.step.flat_state import FlatState, state_of

TRACES: list[tuple[int, ...]] = []


@partial(jax.jit, static_argnames=("scale",), donate_argnames=("acc",))
def _axpy(x: jax.Array, acc: jax.Array, extra: jax.Array | None = None, *, scale: int) -> Any:
    TRACES.append(x.shape)
    out = acc + scale * x
    return out if extra is None else out + extra


class _Held(ProgramTable):
    """Background compiles wait for ``release``: the test decides when they are done."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.threads: list[str] = []

    def _lower(self, fn: Any, static: dict[str, Any], specs: dict[str, Any]) -> Any:
        self.threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            assert self.release.wait(timeout=60)
        return super()._lower(fn, static, specs)


def test_call_compiles_once_per_signature_and_matches_jit() -> None:
    table, x = ProgramTable(), np.arange(4, dtype=np.float32)
    TRACES.clear()
    got = table.call(_axpy, {"scale": 2}, x=x, acc=jnp.ones(4))
    np.testing.assert_array_equal(got, _axpy(x, jnp.ones(4), scale=2))
    table.call(_axpy, {"scale": 2}, x=x + 1, acc=jnp.ones(4))  # new values: no new program
    assert TRACES == [(4,), (4,)]  # one trace for the table, one for the jit reference
    table.call(_axpy, {"scale": 3}, x=x, acc=jnp.ones(4))  # a new static value
    table.call(_axpy, {"scale": 2}, x=np.ones(8, np.float32), acc=jnp.ones(8))  # a new shape
    table.call(_axpy, {"scale": 2}, x=x, acc=jnp.ones(4), extra=jnp.ones(4))  # a new tree
    assert TRACES == [(4,), (4,), (4,), (8,), (4,)]
    assert (table.compiles, table.compiled_ahead) == (4, 0)


def test_ready_compiles_on_a_background_thread_and_the_call_uses_it() -> None:
    table, x = _Held(), np.arange(4, dtype=np.float32)
    TRACES.clear()
    acc = jnp.zeros(4)
    assert not table.ready(_axpy, {"scale": 5}, x=x, acc=acc)
    assert not table.ready(_axpy, {"scale": 5}, x=x, acc=acc)  # still compiling: not twice
    acc.delete()  # compiling ahead holds no argument (a donated buffer may be gone by then)
    table.release.set()
    got = table.call(_axpy, {"scale": 5}, x=x, acc=jnp.ones(4))  # waits for it, then runs it
    np.testing.assert_array_equal(got, 1 + 5 * x)
    assert table.threads == ["tx-compile_0"]
    assert (table.compiles, table.compiled_ahead) == (1, 1)
    assert TRACES == [(4,)]
    assert table.ready(_axpy, {"scale": 5}, x=x, acc=jnp.ones(4))


def test_a_failed_compile_ahead_raises_where_the_program_is_wanted() -> None:
    table = ProgramTable()
    args = {"x": np.ones(4, np.float32), "acc": jnp.ones(3)}  # shapes that do not add up
    if not table.ready(_axpy, {"scale": 1}, **args):
        with pytest.raises(TypeError, match="add got incompatible shapes"):
            table.call(_axpy, {"scale": 1}, **args)
    with pytest.raises(TypeError, match="add got incompatible shapes"):  # not kept as done
        table.call(_axpy, {"scale": 1}, **args)


def test_a_committed_sharding_is_part_of_the_signature() -> None:
    table, x = ProgramTable(), np.ones(4, np.float32)
    device = jax.devices()[0]
    table.call(_axpy, {"scale": 7}, x=x, acc=jnp.ones(4))
    committed = jax.device_put(jnp.ones(4), device)
    assert committed.committed
    np.testing.assert_array_equal(table.call(_axpy, {"scale": 7}, x=x, acc=committed), 8 * x)
    assert table.compiles == 2  # as jit compiles a committed argument anew
    spec = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=committed.sharding)
    assert table.ready(_axpy, {"scale": 7}, x=x, acc=spec)  # an argument to be: same program


@jax.jit
def _total(state: FlatState) -> jax.Array:
    return state_of(state)["w"].sum()


def test_a_model_state_is_keyed_once_and_not_kept_alive() -> None:
    table = ProgramTable()
    state = FlatState.of({"w": jnp.ones(4)})
    assert table.call(_total, {}, state=state) == 4
    assert table.call(_total, {}, state=FlatState.of({"w": 2 * jnp.ones(4)})) == 8
    assert table.compiles == 1
    ref = weakref.ref(state)
    del state
    gc.collect()
    assert ref() is None


PROMPT = np.array([11, 250, 37, 1999, 5, 88, 640, 12, 3, 901], np.int32)


class _JoinThenRelease:
    """Joins ``joiner`` before decode step 3 and releases the held compiles before step 8."""

    def __init__(self, sampler: Sampler, table: _Held, joiner: SampleRequestArrays) -> None:
        self.sampler, self.table, self.joiner = sampler, table, joiner
        self.steps, self.index = 0, -1

    def due(self) -> bool:
        return not self.table.release.is_set()

    def run(self) -> None:
        self.steps += 1
        if self.steps == 3:
            self.index = self.sampler.join(self.joiner)
        if self.steps == 8:
            self.table.release.set()


def test_live_rows_keep_decoding_while_a_joiners_admission_compiles(
    tiny_qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows start; one stops at once. A request joins with a prompt bucket (32) no
    admission has used: what it needs compiles on the background thread (its admission, and
    a resize if the batch has shrunk meanwhile), held there for 5 decode steps of the live
    row (without compiling ahead, the run would block on it for good), and the request is
    admitted once it is ready. Every request gets what it gets alone."""
    eng = TrainingEngine(tiny_qwen3_dir, EngineConfig(max_lora_adapters=1, max_lora_rank=8))
    eng.create_adapter(rank=8, seed=1)
    # One step per dispatch: the interruption counts decode steps.
    sampler = Sampler(eng, max_cache_tokens=256, max_batch=4, decode_chunk=1)
    short = SampleRequestArrays(PROMPT[:4], max_tokens=30, seed=2, stop=[])
    stop = int(sampler.sample([short])[0].sequences[0].tokens[1])
    first = [  # both in 64-slot caches: one run
        SampleRequestArrays(PROMPT, max_tokens=40, seed=1, stop=[], adapter=1),
        SampleRequestArrays(PROMPT[:4], max_tokens=30, seed=2, stop=[stop]),  # ends by step 1
    ]
    joiner = SampleRequestArrays(np.arange(100, 120, dtype=np.int32), max_tokens=6, seed=3, stop=[])
    alone = [sampler.sample([r])[0] for r in [*first, joiner]]
    assert len(alone[1].sequences[0].tokens) <= 2

    table = _Held()
    monkeypatch.setattr(continuous, "PROGRAMS", table)
    table.release.set()
    sampler.sample(first)  # the programs of the call without the joiner: not held
    table.release.clear()
    joins = _JoinThenRelease(sampler, table, joiner)
    waits = sampler.compile_waits
    got = sampler.sample(first, interruption=joins)

    assert joins.index == 2
    assert sampler.compile_waits - waits >= 5  # steps decoded while a program compiled
    assert table.compiled_ahead >= 1  # the joiner's admission, at least
    assert "tx-compile_0" in table.threads
    for res, want in zip(got, alone, strict=True):
        for a, b in zip(res.sequences, want.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
