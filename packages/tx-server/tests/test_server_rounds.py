"""Rounds of a claim: every model's order kept, models aligned round by round."""

from __future__ import annotations

from datetime import datetime

from tx_server.work_queue import ClaimedRequest
from tx_server.worker.rounds import plan_rounds


def _req(rid: str, model: str | None, barrier: bool = False) -> ClaimedRequest:
    return ClaimedRequest(
        request_id=rid, request_type="optim_step" if barrier else "forward_backward",
        tenant_id="t", session_id=None, model_id=model, seq_id=None, model_seq_id=None,
        sampling_session_id=None, barrier=barrier, payload=b"", payload_content_type="",
        created_at=datetime(2026, 1, 1),
    )  # fmt: skip


def test_each_models_segments_become_consecutive_rounds() -> None:
    reqs = [
        _req("a1", "A"), _req("a2", "A", True), _req("b1", "B", True), _req("a3", "A"),
        _req("a4", "A"), _req("b2", "B"), _req("a5", "A", True), _req("b3", "B", True),
        _req("c1", "C", True), _req("a6", "A"), _req("x", None), _req("y", None, True),
    ]  # fmt: skip
    rounds = [[r.request_id for r in rnd] for rnd in plan_rounds(reqs)]
    assert rounds == [
        ["a1", "a2", "b1", "c1", "x", "y"],
        ["a3", "a4", "b2", "a5", "b3"],
        ["a6"],
    ]
    for model in "ABC":  # flattening the rounds keeps every model's own order
        flat = [rid for rnd in rounds for rid in rnd if rid.startswith(model.lower())]
        assert flat == [r.request_id for r in reqs if r.model_id == model]


def test_no_requests_no_rounds() -> None:
    assert plan_rounds([]) == []


def test_rounds_hold_at_most_max_models_models() -> None:
    """A segment that would exceed the cap starts in a later round; a segment never splits,
    and every model's order is still kept."""
    reqs = [
        _req("a1", "A"), _req("b1", "B"), _req("c1", "C"), _req("a2", "A", True),
        _req("c2", "C", True), _req("b2", "B", True), _req("a3", "A"), _req("d1", "D", True),
    ]  # fmt: skip
    rounds = plan_rounds(reqs, max_models=2)
    assert [[r.request_id for r in rnd] for rnd in rounds] == [
        ["a1", "b1", "a2", "b2"],
        ["c1", "c2", "a3"],
        ["d1"],
    ]
    assert all(len({r.model_id for r in rnd}) <= 2 for rnd in rounds)
    for model in "ABCD":
        flat = [r.request_id for rnd in rounds for r in rnd if r.model_id == model]
        assert flat == [r.request_id for r in reqs if r.model_id == model]
    assert plan_rounds(reqs, max_models=4) == plan_rounds(reqs)


def test_runs_holding_a_slot_take_the_first_rounds_places() -> None:
    """Three runs, two slots, B and C loaded: A (parked) waits for round two rather than
    displacing one of them; every model's order is kept."""
    reqs = [
        _req("a1", "A"), _req("a2", "A", True), _req("b1", "B"), _req("b2", "B", True),
        _req("c1", "C"), _req("c2", "C", True), _req("a3", "A"), _req("x", None),
    ]  # fmt: skip
    rounds = plan_rounds(reqs, max_models=2, loaded=lambda m: m in {"B", "C"})
    assert [[r.request_id for r in rnd] for rnd in rounds] == [
        ["b1", "b2", "c1", "c2"],
        ["x", "a1", "a2"],
        ["a3"],
    ]
    assert [[r.request_id for r in rnd] for rnd in plan_rounds(reqs, max_models=2)] == [
        ["a1", "a2", "b1", "b2"],
        ["c1", "c2", "a3"],
        ["x"],
    ]
