"""Probes of paths earlier rounds missed: PostgreSQL's stricter types and its concurrency.

SQLite stores a string of any length, or one holding a NUL character, in a VARCHAR column and
serializes writers (``BEGIN IMMEDIATE``); PostgreSQL refuses such strings and lets two
transactions race on a unique key. Each difference used to surface as a PostgreSQL-only 500,
which the SDK retries for minutes. These tests run the API over a real PostgreSQL server (the
``pg_url`` fixture, skipped without the binaries) and, where the answer must not depend on the
backend, over SQLite too.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tx_server.testing import API_KEY, RunningServer, make_settings, run_server

HEADERS = {"X-API-Key": API_KEY}
SESSION = {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"}
BASE = "Qwen/Qwen3-0.6B"  # served by make_settings; no worker runs in these tests


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """An API server (no worker) over SQLite, then over PostgreSQL."""
    overrides = {}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("pg_url")
    with run_server(make_settings(tmp_path, **overrides)) as server:
        yield server


@pytest.fixture
def pg_server(pg_url: str, tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(make_settings(tmp_path, database_url=pg_url)) as server:
        yield server


def post(server: RunningServer, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/{path}", json=body, headers={**HEADERS, **headers}, timeout=30
    )


def new_session(server: RunningServer) -> str:
    response = post(server, "create_session", SESSION)
    assert response.status_code == 200, response.text
    return str(response.json()["session_id"])


def test_session_fields_the_database_cannot_store_are_user_errors_on_every_backend(
    any_db_server: RunningServer,
) -> None:
    """Over-long or NUL-holding session fields: 400 naming the field, on SQLite as on PostgreSQL
    (where they were a 500 from the database that the SDK retries for minutes)."""
    server = any_db_server
    for field, value in [
        ("sdk_version", "0." * 40),
        ("project_id", "p" * 201),
        ("display_name", "d" * 501),
        ("sdk_version", "0.38\x00"),
        ("project_id", "a\x00b"),
    ]:
        response = post(server, "create_session", {**SESSION, field: value})
        assert response.status_code == 400, (field, response.text)
        assert field in response.json()["detail"]
        assert response.json()["category"] == "user"
    long_key = post(server, "create_session", SESSION, **{"X-Idempotency-Key": "k" * 201})
    assert long_key.status_code == 400, long_key.text
    assert "X-Idempotency-Key" in long_key.json()["detail"]
    # A NUL in the free-text finish detail must not keep a session from finishing.
    session_id = new_session(server)
    finish = post(
        server, f"sessions/{session_id}/finish", {"reason": {"type": "success"}, "detail": "x\x00y"}
    )
    assert finish.status_code == 204, finish.text
    heartbeat = post(server, "session_heartbeat", {"session_id": session_id})
    assert heartbeat.status_code == 410


def test_postgresql_lookups_with_unstorable_values_are_user_errors(
    pg_server: RunningServer,
) -> None:
    """A NUL character in an id, or an over-long id in a request recorded as failed on arrival:
    PostgreSQL raises a DataError, which must be a 400 (category user), never a 500."""
    server = pg_server
    info = post(server, "get_info", {"model_id": "m\x00", "type": "get_info"})
    assert info.status_code == 400, info.text
    assert info.json()["category"] == "user"
    poll = post(server, "retrieve_future", {"request_id": "r\x00"})
    assert poll.status_code == 400, poll.text
    create = {
        "session_id": "s" * 100,
        "model_seq_id": 0,
        "base_model": "not/served",
        "type": "create_model",
    }
    created = post(server, "create_model", create)
    assert created.status_code < 500, created.text
    assert new_session(server)  # the server is fine afterwards


def racing(n: int, call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """``call()`` from ``n`` threads released at the same moment."""
    barrier, answers = threading.Barrier(n), []

    def go() -> None:
        barrier.wait()
        answers.append(call())

    threads = [threading.Thread(target=go) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_postgresql_racing_retries_of_a_creation_get_the_original(
    pg_server: RunningServer,
) -> None:
    """Transport retries of one create_model / create_sampling_session / create_session that
    overlap their original (same keys) each get the original's answer. On PostgreSQL the losers
    of the race on the primary key used to get a 500 (SQLite serializes the writes)."""
    server = pg_server
    for _ in range(4):
        key = str(uuid.uuid4())
        sessions = racing(
            6, lambda k=key: post(server, "create_session", SESSION, **{"X-Idempotency-Key": k})
        )
        assert {r.status_code for r in sessions} == {200}, [r.text for r in sessions]
        assert len({r.json()["session_id"] for r in sessions}) == 1
        session_id = sessions[0].json()["session_id"]
        model = {
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": BASE,
            "lora_config": {"rank": 4},
            "type": "create_model",
        }
        models = racing(6, lambda body=model: post(server, "create_model", body))
        assert {r.status_code for r in models} == {200}, [r.text for r in models]
        assert len({r.json()["request_id"] for r in models}) == 1
        sampler = {
            "session_id": session_id,
            "sampling_session_seq_id": 0,
            "base_model": BASE,
            "type": "create_sampling_session",
        }
        samplers = racing(6, lambda body=sampler: post(server, "create_sampling_session", body))
        assert {r.status_code for r in samplers} == {200}, [r.text for r in samplers]
        assert {r.json()["sampling_session_id"] for r in samplers} == {f"{session_id}:sample:0"}


def test_a_base_model_named_twice_is_served_once(tmp_path: Path) -> None:
    """``tx serve --base-model A --base-model B --base-model A``: capabilities list A once."""
    models = ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B"]
    with run_server(make_settings(tmp_path, base_models=models)) as server:
        response = httpx.get(f"{server.url}/api/v1/get_server_capabilities", headers=HEADERS)
    names = [m["model_name"] for m in response.json()["supported_models"]]
    assert names == ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"]


QWEN, LLAMA = "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.filterwarnings("ignore:DEPRECATED. TrainingClient.load_state:FutureWarning")
def test_two_base_models_train_and_sample_side_by_side_and_never_mix(
    tmp_path: Path, open_service_client: Callable[..., Any]
) -> None:
    """One server, a Qwen3 and a Llama 3 (the kit's tiny ones under hub names), the official
    SDK: a run of each trains and samples at the same time; a checkpoint of one is refused by
    the other, clearly; an unknown model's error lists both. (Tokenizers are not compared
    here: looking a hub name up in this process would miss the offline aliases, which
    huggingface_hub reads at import.)"""
    import tinker
    from tinker import types

    from tx_server.settings import EngineSettings
    from tx_server.testing import run_hub_model_server

    engine = EngineSettings(max_lora_rank=4, max_seq_len=64, max_lora_adapters=2)
    with run_hub_model_server(tmp_path, base_models=[QWEN, LLAMA], engine=engine) as server:
        sc = open_service_client(server.url, API_KEY)
        caps = sc.get_server_capabilities()
        assert [m.model_name for m in caps.supported_models] == [QWEN, LLAMA]
        tokens = [5, 17, 42, 9, 101, 77, 3, 50]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64")},
        )
        runs: dict[str, Any] = {}
        failures: list[BaseException] = []

        def train_and_sample(base: str) -> None:
            try:
                tc = sc.create_lora_training_client(base, rank=4, seed=1).result(timeout=300)
                fb = tc.forward_backward([datum], "cross_entropy")
                opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
                assert fb.result(timeout=300).metrics["loss:sum"] > 0
                opt.result(timeout=300)
                path = tc.save_state("s").result(timeout=300).path
                sampler = tc.save_weights_and_get_sampling_client()
                params = types.SamplingParams(max_tokens=3, stop=[])
                out = sampler.sample(types.ModelInput.from_ints(tokens[:3]), 1, params)
                assert len(out.result(timeout=300).sequences[0].tokens) == 3
                runs[base] = (tc, path)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=train_and_sample, args=(b,)) for b in (QWEN, LLAMA)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        (qwen, qwen_path), (llama, _) = runs[QWEN], runs[LLAMA]
        assert qwen.get_info().model_data.model_name == QWEN
        assert llama.get_info().model_data.model_name == LLAMA
        with pytest.raises(tinker.BadRequestError, match="is a checkpoint of base model"):
            llama.load_state(qwen_path).result(timeout=60)
        wrong = sc.create_sampling_client(model_path=qwen_path, base_model=LLAMA)  # lazy
        with pytest.raises(tinker.BadRequestError, match="does not match"):
            wrong.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1))
        with pytest.raises(tinker.RequestFailedError) as unknown:
            sc.create_lora_training_client("nope/model", rank=4).result(timeout=60)
        assert QWEN in str(unknown.value)
        assert LLAMA in str(unknown.value)


def test_a_local_model_served_with_a_trailing_slash_answers_to_either_spelling(
    tmp_path: Path,
) -> None:
    """Spec §8: a local directory is served as ``/models/x/`` (so the SDK's tokenizer heuristic
    does not cut it); a script naming it ``/models/x`` gets that model, recorded and echoed in
    the served spelling, instead of "not served"."""
    served = f"{tmp_path / 'models' / 'tiny'}/"
    with run_server(make_settings(tmp_path, base_models=[served])) as server:
        session_id = new_session(server)
        model = {
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": served.rstrip("/"),
            "lora_config": {"rank": 4},
            "type": "create_model",
        }
        created = post(server, "create_model", model)
        assert created.status_code == 200, created.text
        model_id = created.json()["model_id"]
        info = post(server, "get_info", {"model_id": model_id, "type": "get_info"})
        assert info.json()["model_data"]["model_name"] == served
        sampler = {
            "session_id": session_id,
            "sampling_session_seq_id": 0,
            "base_model": served.rstrip("/"),
            "type": "create_sampling_session",
        }
        answer = post(server, "create_sampling_session", sampler)
        assert answer.status_code == 200, answer.text
        sampler_id = answer.json()["sampling_session_id"]
        got = httpx.get(f"{server.url}/api/v1/samplers/{sampler_id}", headers=HEADERS)
        assert got.json()["base_model"] == served
        unknown = post(server, "create_model", {**model, "model_seq_id": 1, "base_model": "/"})
        assert unknown.status_code == 200  # recorded as a failed future (user), as before


def test_postgresql_row_ids_go_past_2_31(pg_url: str, tmp_path: Path) -> None:
    """``futures.id`` and ``checkpoints.id`` were 32-bit SERIALs on PostgreSQL (64-bit rowids on
    SQLite): after 2^31 requests every submission failed. A database made at revision 0001 is
    migrated at start, and its next request gets an id past 2^31."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tx_server.db.database import Database, upgrade

    name = f"tx_ids_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    db = Database(url)
    upgrade(db.engine, "0001")
    with db.engine.begin() as conn:
        for table in ("futures", "checkpoints"):
            conn.execute(
                text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {2**31 - 1})")
            )
    with run_server(make_settings(tmp_path, database_url=url)) as server:
        session_id = new_session(server)
        model = {
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": BASE,
            "lora_config": {"rank": 4},
            "type": "create_model",
        }
        created = post(server, "create_model", model)
        assert created.status_code == 200, created.text
    with db.engine.connect() as conn:
        assert conn.scalar(text("SELECT max(id) FROM futures")) == 2**31
    db.dispose()
