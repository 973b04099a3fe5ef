"""RestClient listings across runs (spec §4.4) on a real server: ``list_user_checkpoints``
(``GET /api/v1/checkpoints``), ``list_sessions`` and ``get_session`` (``GET /api/v1/sessions``).

Live API + worker thread serving the tx-engine kit's tiny Qwen3 as ``Qwen/Qwen3-8B``. Tenant A
saves checkpoints from two training runs (interleaved, both kinds), tenant B saves one of its
own. A's listing, through the unmodified tinker SDK 0.38.0 and through tx-client, holds exactly
A's live checkpoints, newest first, paged by limit/offset with ``cursor.total_count``; a
deleted checkpoint and one whose TTL ran out (the cleanup is kept away) are not listed.
Tenant C's sessions are listed newest first, each with its runs, samplers and metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tinker

import tx_client
from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server

BASE = "Qwen/Qwen3-8B"
KEY_B = "tml-tx-server-tests-key-0002"
KEY_C = "tml-tx-server-tests-key-0003"
TIMEOUT = 120


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=64)
    root = tmp_path_factory.mktemp("user-checkpoints")
    # Short TTLs allowed, but no cleanup during the test: expired rows stay in the database.
    overrides = {"checkpoint_min_ttl_seconds": 1, "maintenance_interval_seconds": 3600.0}
    with run_hub_model_server(root, base_models=[BASE], engine=engine, **overrides) as server:
        yield server


def _paths(listing: Any) -> list[str]:
    return [c.tinker_path for c in listing.checkpoints]


def _cursor(listing: Any) -> tuple[int, int, int]:
    """``(offset, limit, total_count)`` of a listing (the cursor must be there)."""
    assert listing.cursor is not None
    return listing.cursor.offset, listing.cursor.limit, listing.cursor.total_count


def _pages(rest: Any, limit: int) -> list[str]:
    """Every page of ``rest.list_user_checkpoints`` at ``limit``, checking each page's cursor."""
    paths: list[str] = []
    offset, total = 0, None
    while total is None or offset < total:
        page = rest.list_user_checkpoints(limit=limit, offset=offset).result(timeout=30)
        *offset_limit, count = _cursor(page)
        assert offset_limit == [offset, limit]
        assert total in (None, count)
        total = count
        assert len(page.checkpoints) == min(limit, total - offset)
        paths += _paths(page)
        offset += limit
    return paths


def test_user_checkpoints_are_the_callers_newest_first_and_paginated(
    live: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc_a = open_service_client(live.url, API_KEY)
    sc_b = open_service_client(live.url, KEY_B)
    run_1, run_2 = (
        sc_a.create_lora_training_client(BASE, rank=4, seed=s).result(timeout=TIMEOUT)
        for s in (1, 2)
    )
    run_b = sc_b.create_lora_training_client(BASE, rank=4, seed=3).result(timeout=TIMEOUT)
    saved = [  # oldest first, alternating runs and kinds
        run_1.save_state("r1-state").result(timeout=TIMEOUT).path,
        run_2.save_weights_for_sampler("r2-sampler").result(timeout=TIMEOUT).path,
        run_2.save_state("r2-state").result(timeout=TIMEOUT).path,
        run_1.save_weights_for_sampler("r1-sampler").result(timeout=TIMEOUT).path,
        run_1.save_state("r1-later").result(timeout=TIMEOUT).path,
    ]
    foreign = run_b.save_state("b-state").result(timeout=TIMEOUT).path
    newest_first = saved[::-1]

    rest = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    listing = rest.list_user_checkpoints().result(timeout=30)
    assert _paths(listing) == newest_first
    assert _cursor(listing) == (0, 100, 5)
    by_path = {c.tinker_path: c for c in listing.checkpoints}
    assert by_path[saved[0]].checkpoint_id == "weights/r1-state"
    assert by_path[saved[0]].checkpoint_type == "training"
    assert by_path[saved[1]].checkpoint_id == "sampler_weights/r2-sampler"
    assert by_path[saved[1]].checkpoint_type == "sampler"
    times = [c.time for c in listing.checkpoints]
    assert times == sorted(times, reverse=True)
    # The same objects as the per-run listing.
    per_run = {
        c.tinker_path: c
        for run in (run_1, run_2)
        for c in rest.list_checkpoints(run.model_id).result(timeout=30).checkpoints
    }
    assert per_run == by_path

    for limit in (1, 2, 3, 5):
        assert _pages(rest, limit) == newest_first
    past_the_end = rest.list_user_checkpoints(limit=2, offset=5).result(timeout=30)
    assert past_the_end.checkpoints == []
    assert _cursor(past_the_end) == (5, 2, 5)
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):  # bounded like list_training_runs
        with pytest.raises(tinker.UnprocessableEntityError):
            rest.list_user_checkpoints(**bad).result(timeout=30)

    rest_b = tinker.RestClient(base_url=live.url, api_key=KEY_B)
    only_b = rest_b.list_user_checkpoints().result(timeout=30)
    assert _paths(only_b) == [foreign]
    assert _cursor(only_b) == (0, 100, 1)

    # A deleted checkpoint and an expired one (its row still there) are gone from the list.
    rest.delete_checkpoint_from_tinker_path(saved[2]).result(timeout=30)
    expiring = run_2.save_state("r2-expiring", ttl_seconds=1).result(timeout=TIMEOUT).path
    assert _paths(rest.list_user_checkpoints(limit=1).result(timeout=30)) == [expiring]
    time.sleep(1.5)
    assert (live.settings.checkpoint_root / run_2.model_id / "weights" / "r2-expiring").is_dir()
    remaining = [p for p in newest_first if p != saved[2]]
    listing = rest.list_user_checkpoints().result(timeout=30)
    assert _paths(listing) == remaining
    assert _cursor(listing) == (0, 100, 4)
    assert _pages(rest, 3) == remaining

    # tx-client: the same call, the same answer.
    ours = tx_client.RestClient(base_url=live.url, api_key=API_KEY)
    listing_tx = ours.list_user_checkpoints().result(timeout=30)
    assert isinstance(listing_tx, tx_client.types.CheckpointsListResponse)
    assert _paths(listing_tx) == remaining
    assert _cursor(listing_tx) == (0, 100, 4)
    assert [c.model_dump(mode="json") for c in listing_tx.checkpoints] == [
        c.model_dump(mode="json") for c in listing.checkpoints
    ]
    assert _pages(ours, 3) == remaining
    sc_tx = open_service_client(live.url, KEY_B, sdk=tx_client)
    assert _paths(sc_tx.create_rest_client().list_user_checkpoints().result(timeout=30)) == [
        foreign
    ]


def test_sessions_are_the_callers_newest_first_with_their_runs_and_samplers(
    live: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    """``list_sessions`` / ``get_session`` answered 404 for both SDKs: now the caller's
    session ids, newest first and paged; a session's training runs and samplers in creation
    order with its metadata and display name; another tenant's session is a 404."""
    first = open_service_client(live.url, KEY_C, user_metadata={"exp": "a"}, display_name="one")
    run = first.create_lora_training_client(BASE, rank=4, seed=1).result(timeout=TIMEOUT)
    other_run = first.create_lora_training_client(BASE, rank=4, seed=2).result(timeout=TIMEOUT)
    first.create_sampling_client(base_model=BASE).result(timeout=TIMEOUT)
    second = open_service_client(live.url, KEY_C)
    second.create_lora_training_client(BASE, rank=4, seed=3).result(timeout=TIMEOUT)
    session_1, session_2 = (
        tc.model_id.split(":train:")[0]
        for tc in (run, second.create_lora_training_client(BASE, rank=4).result(timeout=TIMEOUT))
    )

    for sdk in (tinker, tx_client):
        rest = sdk.RestClient(base_url=live.url, api_key=KEY_C)
        assert rest.list_sessions().result(timeout=30).sessions == [session_2, session_1]
        assert rest.list_sessions(limit=1, offset=1).result(timeout=30).sessions == [session_1]
        assert rest.list_sessions(offset=2).result(timeout=30).sessions == []
        info = rest.get_session(session_1).result(timeout=30)
        assert info.training_run_ids == [run.model_id, other_run.model_id]
        (sampler_id,) = info.sampler_ids
        assert rest.get_sampler(sampler_id).result(timeout=30).base_model == BASE
        assert info.user_metadata == {"exp": "a"}
        assert info.display_name == "one"
        assert len(rest.get_session(session_2).result(timeout=30).training_run_ids) == 2
        with pytest.raises(sdk.UnprocessableEntityError):
            rest.list_sessions(limit=0).result(timeout=30)
        with pytest.raises(sdk.NotFoundError):
            sdk.RestClient(base_url=live.url, api_key=KEY_B).get_session(session_1).result(
                timeout=30
            )
    assert (
        session_1
        not in tinker.RestClient(base_url=live.url, api_key=KEY_B)
        .list_sessions()
        .result(timeout=30)
        .sessions
    )
