"""Adapter-slot lifecycle: unload and finished sessions free slots; samplers yield to training;
more runs than slots are parked and resume exactly.

Real API, SQLite, worker thread and the official SDK, with ``max_lora_adapters=2`` so that slot
pressure shows after two runs. ``unload_model`` is queued here the way the route is meant to
queue it (a barrier ``unload_model`` row of the model), since the route only acknowledges today.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import select
from tinker import types

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus, ModelRow, utcnow
from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server
from tx_server.work_queue import prune_finished

BASE = "Qwen/Qwen3-8B"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12, 33, 8]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module (the engine compiles once); each test finishes its sessions."""
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=2, max_seq_len=64)
    root = tmp_path_factory.mktemp("slots")
    with run_hub_model_server(root, base_models=[BASE], engine=engine) as server:
        yield server


def finish(server: RunningServer, sc: tinker.ServiceClient, *runs: tinker.TrainingClient) -> None:
    """Finish the session and wait until its runs' slots are free for the next test."""
    sc.close("success").result(timeout=60)
    for tc in runs:
        wait_for_slot(server, tc.model_id, None)


def datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=TOKENS[1:], dtype="int64")},
    )


def create(sc: tinker.ServiceClient) -> tinker.TrainingClient:
    return sc.create_lora_training_client(BASE, rank=4, seed=0).result(timeout=120)


def slot_of(server: RunningServer, model_id: str) -> int | None:
    db = Database(server.settings.database_url)
    try:
        with db.read() as session:
            row = session.get(ModelRow, model_id)
            assert row is not None
            return row.adapter_slot
    finally:
        db.dispose()


def wait_for_slot(server: RunningServer, model_id: str, expected: int | None) -> None:
    deadline = time.monotonic() + 30
    while slot_of(server, model_id) != expected:
        assert time.monotonic() < deadline, f"slot of {model_id} never became {expected}"
        time.sleep(0.1)


def unload(server: RunningServer, model_id: str) -> None:
    """``POST /unload_model`` (what SDKs call) and wait until the worker has run the barrier."""
    r = httpx.post(
        f"{server.url}/api/v1/unload_model",
        json={"model_id": model_id, "type": "unload_model"},
        headers={"X-API-Key": API_KEY},
    )
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == model_id
    db = Database(server.settings.database_url)
    query = select(FutureRow).where(
        FutureRow.model_id == model_id, FutureRow.request_type == "unload_model"
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            with db.read() as session:
                row = session.scalar(query)
                assert row is not None, "the route queued no unload_model request"
                if row.status in (FutureStatus.COMPLETED, FutureStatus.FAILED):
                    assert row.status == FutureStatus.COMPLETED, row.error_message
                    return
            assert time.monotonic() < deadline, "unload_model never ran"
            time.sleep(0.1)
    finally:
        db.dispose()


def expect_user_error(future: object, *words: str) -> None:
    with pytest.raises(tinker.RequestFailedError) as info:
        future.result(timeout=120)  # type: ignore[attr-defined]
    assert info.value.category == tinker.types.RequestErrorCategory.User, info.value
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unload_frees_the_slot_and_later_requests_fail_as_user_errors(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    first, second = create(sc), create(sc)
    assert slot_of(live, first.model_id) is not None
    unload(live, first.model_id)
    assert slot_of(live, first.model_id) is None
    expect_user_error(first.forward_backward([datum()], "cross_entropy"), "unloaded")
    expect_user_error(first.optim_step(types.AdamParams(learning_rate=1e-3)), "unloaded")
    third = create(sc)  # takes the freed slot
    assert slot_of(live, third.model_id) is not None
    second.forward([datum()], "cross_entropy").result(timeout=120)
    finish(live, sc, second, third)


def test_finishing_a_session_frees_its_runs_slots(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    ending, staying = sdk_service(live), sdk_service(live)
    gone = [create(ending), create(ending)]
    ending.close("success").result(timeout=60)
    for tc in gone:
        wait_for_slot(live, tc.model_id, None)
    kept = create(staying)
    kept.forward_backward([datum()], "cross_entropy").result(timeout=120)
    # The closed SDK client cannot send any more; a raw request for the finished run fails.
    failure = optim_step_outcome(live, gone[0].model_id)
    assert failure["category"] == "user"
    assert "finished" in failure["error"]
    finish(live, staying, kept)


def optim_step_outcome(server: RunningServer, model_id: str) -> dict[str, str]:
    """Submit an ``optim_step`` over plain HTTP and return its (failed) outcome or refusal."""
    headers = {"X-API-Key": API_KEY}
    body = {
        "model_id": model_id,
        "seq_id": 1000,
        "type": "optim_step",
        "adam_params": {"learning_rate": 1e-3},
    }
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=60) as http:
        submitted = http.post("/optim_step", json=body)
        if submitted.status_code >= 400:  # a route may refuse finished sessions up front
            return {"category": "user", "error": submitted.text}
        request_id = submitted.json()["request_id"]
        while (
            polled := http.post("/retrieve_future", json={"request_id": request_id})
        ).status_code == 408:
            pass
        outcome: dict[str, str] = polled.json()
        return outcome


def test_sampler_slots_are_evicted_for_training_and_reloaded_from_disk(
    live: RunningServer, sdk_service: Callable[[RunningServer], tinker.ServiceClient]
) -> None:
    sc = sdk_service(live)
    tc = create(sc)
    path = tc.save_weights_for_sampler("snap").result(timeout=120).path
    sampler = sc.create_sampling_client(model_path=path).result(timeout=120)
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    prompt = types.ModelInput.from_ints(TOKENS[:5])
    first = sampler.sample(prompt, 1, params).result(timeout=120).sequences[0].tokens
    # Both slots are taken (the run and the cached sampler): training wins the sampler's slot.
    other = create(sc)
    assert slot_of(live, other.model_id) is not None
    assert slot_of(live, tc.model_id) is not None
    # Every slot now holds a live run: the least recently used one is parked for the sampler.
    again = sampler.sample(prompt, 1, params).result(timeout=120).sequences[0].tokens
    assert again == first  # reloaded from its files, same greedy tokens
    assert slot_of(live, tc.model_id) is None
    assert slot_of(live, other.model_id) is not None
    tc.forward([datum()], "cross_entropy").result(timeout=120)  # restored: the sampler yields
    assert slot_of(live, tc.model_id) is not None
    finish(live, sc, tc, other)


def test_pruning_keeps_the_unload_record(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    db.upgrade()
    long_ago = utcnow() - timedelta(days=30)
    with db.write() as session:
        for i, kind in enumerate(("unload_model", "optim_step")):
            session.add(
                FutureRow(
                    request_id=f"r{i}",
                    tenant_id="t",
                    request_type=kind,
                    model_id="s:train:0",
                    barrier=True,
                    payload=b"{}",
                    payload_content_type="application/json",
                    status=FutureStatus.COMPLETED,
                    finished_at=long_ago,
                )
            )
    assert prune_finished(db, timedelta(days=7)) == 1
    with db.read() as session:
        assert session.scalars(select(FutureRow.request_type)).all() == ["unload_model"]
    db.dispose()


def test_more_runs_than_slots_are_parked_and_resume_exactly(
    live: RunningServer,
    sdk_service: Callable[[RunningServer], tinker.ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three live runs on two slots: creating the third parks the least recently used run
    between its ``forward_backward`` and its ``optim_step``; the step then restores it
    (snapshot + replayed pass), parking another. Its losses equal those of the same run
    trained without parking, to the bit."""
    caplog.set_level(logging.INFO, logger="tx_server.worker.engines")
    sc = sdk_service(live)
    adam = types.AdamParams(learning_rate=1e-2)

    def loss(future: Any) -> float:
        return float(future.result(timeout=120).metrics["loss:sum"])

    reference = create(sc)
    expected = [loss(reference.forward_backward([datum()], "cross_entropy"))]
    reference.optim_step(adam).result(timeout=120)
    expected.append(loss(reference.forward_backward([datum()], "cross_entropy")))
    reference.optim_step(adam).result(timeout=120)
    expected.append(loss(reference.forward([datum()], "cross_entropy")))
    unload(live, reference.model_id)

    run = create(sc)  # the same seed: the same initial adapter
    got = [loss(run.forward_backward([datum()], "cross_entropy"))]
    run.optim_step(adam).result(timeout=120)
    got.append(loss(run.forward_backward([datum()], "cross_entropy")))  # gradients pending
    second = create(sc)
    third = create(sc)  # parks `run`, the least recently used
    assert slot_of(live, run.model_id) is None
    assert {slot_of(live, second.model_id), slot_of(live, third.model_id)} == {1, 2}
    run.optim_step(adam).result(timeout=120)  # restores it: parks `second`
    assert slot_of(live, second.model_id) is None
    got.append(loss(run.forward([datum()], "cross_entropy")))
    assert got == expected
    second.forward([datum()], "cross_entropy").result(timeout=120)  # comes back in turn
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith(f"parked model {run.model_id}") for m in messages) == 1, messages
    assert any(f"restored parked model {run.model_id}" in m and "1 requests replayed" in m for m in messages), messages  # fmt: skip
    finish(live, sc, run, second, third)
