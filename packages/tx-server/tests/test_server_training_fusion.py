"""The worker's executor on a real engine: one engine call for every tenant's passes.

Requests go through the real queue (``FutureStore.submit`` → ``WorkQueue.claim_pending``) and
the real tiny Qwen3 engine; the served base model is given as a local directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import select

from tx_server.db.database import Database
from tx_server.db.models import FutureRow, FutureStatus
from tx_server.futures import PROTOBUF, FutureStore, RequestType, Submission
from tx_server.settings import EngineSettings
from tx_server.testing import make_settings
from tx_server.work_queue import WorkQueue
from tx_server.worker.executor import HANDLED_TYPES, Executor
from tx_types import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ModelInput,
    OptimStepRequest,
    TensorData,
)
from tx_types.proto import decode_forward_backward_output, encode_forward_backward_request

TOKENS = [4, 8, 15, 16, 23, 42, 7, 99]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FutureStore, Executor]]:
    from tx_engine.testing import ensure_model

    root = tmp_path_factory.mktemp("fusion")
    base = str(ensure_model("tiny-qwen3"))
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=3, max_seq_len=32)
    settings = make_settings(root, base_models=[base], engine=engine)
    db = Database(settings.database_url)
    db.upgrade()
    queue = WorkQueue(db)
    store = FutureStore(db, queue.bus)
    executor = Executor(settings, queue)
    for tenant, model_id, seed in (("t1", "s1:train:0", 1), ("t2", "s2:train:0", 2)):
        body = {"session_id": "x", "model_seq_id": 0, "base_model": base}
        body["lora_config"] = {"rank": 4, "seed": seed}  # type: ignore[assignment]
        payload = json.dumps(body).encode()
        store.submit(tenant, Submission(RequestType.CREATE_MODEL, payload, model_id=model_id))
    _run_all(queue, executor)
    yield store, executor
    queue.bus.close()
    db.dispose()


def _run_all(queue: WorkQueue, executor: Executor) -> int:
    claimed = queue.claim_pending(request_types=HANDLED_TYPES)
    executor.run(claimed)
    return len(claimed)


def _forward(
    store: FutureStore,
    tenant: str,
    model_id: str,
    seq: int,
    tokens: list[int],
    backward: bool = False,
) -> str:
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": TensorData(data=tokens[1:], dtype="int64")},
    )
    fwd = ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    body = encode_forward_backward_request(
        model_id, seq, fwd, forward_only=not backward, compress=False
    )
    rtype = RequestType.FORWARD_BACKWARD if backward else RequestType.FORWARD
    return store.submit(tenant, Submission(rtype, body, PROTOBUF, model_id=model_id, seq_id=seq))


def _optim_step(store: FutureStore, tenant: str, model_id: str, seq: int) -> str:
    body = OptimStepRequest(
        optim_params=AdamParams(learning_rate=0.1), model_id=model_id, seq_id=seq
    ).model_dump_json()
    submission = Submission(RequestType.OPTIM_STEP, body.encode(), model_id=model_id, seq_id=seq)
    return store.submit(tenant, submission)


def _row(store: FutureStore, request_id: str) -> FutureRow:
    with store.db.read() as s:
        row = s.scalar(select(FutureRow).where(FutureRow.request_id == request_id))
        assert row is not None
        return row


def _logprobs(store: FutureStore, request_id: str) -> np.ndarray:
    row = _row(store, request_id)
    assert row.status is FutureStatus.COMPLETED, row.error_message
    assert row.result is not None
    out = decode_forward_backward_output(row.result)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data)


def test_two_tenants_share_one_engine_call(rig: tuple[FutureStore, Executor]) -> None:
    store, executor = rig
    a = _forward(store, "t1", "s1:train:0", 1, TOKENS)
    b = _forward(store, "t2", "s2:train:0", 1, TOKENS[:5])
    calls = executor.engine_calls
    assert _run_all(executor.queue, executor) == 2
    assert executor.engine_calls == calls + 1  # fused
    fused = (_logprobs(store, a), _logprobs(store, b))
    alone_a = _forward(store, "t1", "s1:train:0", 2, TOKENS)
    _run_all(executor.queue, executor)
    alone_b = _forward(store, "t2", "s2:train:0", 2, TOKENS[:5])
    _run_all(executor.queue, executor)
    np.testing.assert_allclose(fused[0], _logprobs(store, alone_a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused[1], _logprobs(store, alone_b), rtol=1e-5, atol=1e-6)


def test_one_tenants_bad_input_fails_only_that_request(rig: tuple[FutureStore, Executor]) -> None:
    store, executor = rig
    good = _forward(store, "t1", "s1:train:0", 3, TOKENS)
    bad = _forward(store, "t2", "s2:train:0", 3, [*TOKENS[:-1], 10**7])
    _run_all(executor.queue, executor)
    assert _logprobs(store, good).shape == (len(TOKENS) - 1,)
    failed = _row(store, bad)
    assert failed.status is FutureStatus.FAILED
    assert failed.error_category == "user"
    assert "target_tokens" in (failed.error_message or "")


def test_a_pipelined_backlog_runs_in_order_in_one_claim(
    rig: tuple[FutureStore, Executor],
) -> None:
    """fwd_bwd, optim_step, forward of two tenants, all queued before the worker looks: one
    claim, run in rounds — the passes of both tenants fuse, and each forward sees its step."""
    store, executor = rig
    tenants = (("t1", "s1:train:0"), ("t2", "s2:train:0"))
    before = {}
    for tenant, model in tenants:
        before[model] = _forward(store, tenant, model, 10, TOKENS)
        _run_all(executor.queue, executor)
    backlog = {}
    for tenant, model in tenants:
        _forward(store, tenant, model, 11, TOKENS, backward=True)
        _optim_step(store, tenant, model, 12)
        backlog[model] = _forward(store, tenant, model, 13, TOKENS)
    calls = executor.engine_calls
    claimed = executor.queue.claim_pending(request_types=HANDLED_TYPES, through_barriers=True)
    assert [c.seq_id for c in claimed] == [11, 12, 13] * 2  # both backlogs, barriers and all
    executor.run(claimed)
    assert executor.engine_calls == calls + 2  # one fused backward call, one fused forward
    for tenant, model in tenants:
        after = _forward(store, tenant, model, 14, TOKENS)
        _run_all(executor.queue, executor)
        stepped = _logprobs(store, backlog[model])
        np.testing.assert_allclose(stepped, _logprobs(store, after), rtol=1e-5, atol=1e-6)
        assert np.abs(stepped - _logprobs(store, before[model])).max() > 1e-3  # ran after it
