"""The background recovery-snapshot writer: what reaches the disk, in what order, and when.

Real files through the engine's checkpoint format; the state callables stand in for
``TrainingEngine.adapter_state_later`` (one of them blocks, to hold the writer mid-write).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tx_engine.checkpoint import AdapterState, LoraConfig, load_adapter
from tx_server.errors import ServerFaultError
from tx_server.worker.snapshots import SnapshotWriter, snapshot_dir, snapshot_owners

MODEL = "session-1:train:0"


def state(step: int) -> Callable[[], AdapterState]:
    factors = {"layers.0.q.lora_a": np.full((4, 2), float(step), np.float32)}
    moments = {f"{k}/layers.0.q.lora_a": np.zeros((4, 2), np.float32) for k in ("m", "v")}
    return lambda: AdapterState(LoraConfig(rank=2, alpha=4.0, seed=1), factors, moments, step)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SnapshotWriter]:
    w = SnapshotWriter(tmp_path)
    yield w
    w.close()


def on_disk(root: Path) -> list[str]:
    base = snapshot_dir(root, MODEL)
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def test_a_waited_snapshot_is_on_disk_and_loads(writer: SnapshotWriter, tmp_path: Path) -> None:
    writer.submit(MODEL, "req-1", state(1), wait=True)
    loaded = load_adapter(snapshot_dir(tmp_path, MODEL) / "req-1", with_optimizer=True)
    assert loaded.step == 1
    np.testing.assert_array_equal(loaded.factors["layers.0.q.lora_a"], np.ones((4, 2)))
    assert snapshot_owners(tmp_path) == [MODEL]


def test_the_newest_two_are_kept(writer: SnapshotWriter, tmp_path: Path) -> None:
    for i in range(1, 4):
        writer.submit(MODEL, f"req-{i}", state(i), wait=True)
    assert on_disk(tmp_path) == ["req-2", "req-3"]


def test_pending_states_of_a_run_are_coalesced(writer: SnapshotWriter, tmp_path: Path) -> None:
    release, started = threading.Event(), threading.Event()

    def blocked() -> AdapterState:
        started.set()
        release.wait(30)
        return state(1)()

    writer.submit(MODEL, "req-1", blocked, wait=False)
    assert started.wait(30)
    for i in range(2, 5):  # queued while req-1 is being written: only the newest survives
        writer.submit(MODEL, f"req-{i}", state(i), wait=False)
    release.set()
    writer.flush()
    assert on_disk(tmp_path) == ["req-1", "req-4"]


def test_drop_cancels_pending_work_and_deletes(writer: SnapshotWriter, tmp_path: Path) -> None:
    writer.submit(MODEL, "req-1", state(1), wait=True)
    release = threading.Event()
    writer.submit("other:train:0", "o-1", lambda: (release.wait(30), state(9)())[1], wait=False)
    writer.submit(MODEL, "req-2", state(2), wait=False)  # waits behind the other run's write
    writer.drop(MODEL)
    release.set()
    writer.flush()
    assert not snapshot_dir(tmp_path, MODEL).exists()
    assert snapshot_owners(tmp_path) == ["other:train:0"]


def test_a_failed_write_is_reported_and_the_writer_goes_on(
    writer: SnapshotWriter, tmp_path: Path
) -> None:
    def broken() -> AdapterState:
        raise RuntimeError("device lost")

    with pytest.raises(ServerFaultError, match="recovery snapshot"):
        writer.submit(MODEL, "req-1", broken, wait=True)
    writer.submit(MODEL, "req-2", state(2), wait=True)
    assert on_disk(tmp_path) == ["req-2"]


def test_names_that_cannot_be_directories_are_refused(writer: SnapshotWriter) -> None:
    with pytest.raises(ServerFaultError, match="cannot name a directory"):
        writer.submit("../escape", "req-1", state(1), wait=False)


def test_a_busy_worker_defers_writes_until_idle(writer: SnapshotWriter, tmp_path: Path) -> None:
    writer.set_worker_busy(True)
    writer.submit(MODEL, "req-1", state(1), wait=False)
    time.sleep(0.3)
    assert on_disk(tmp_path) == []  # not while the worker runs requests
    writer.set_worker_busy(False)
    writer.flush()
    assert on_disk(tmp_path) == ["req-1"]


def test_waiting_or_a_long_busy_spell_forces_the_write(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path, max_lag=0.5)
    try:
        writer.set_worker_busy(True)
        writer.submit(MODEL, "req-1", state(1), wait=True)  # a waiter is served at once
        assert on_disk(tmp_path) == ["req-1"]
        started = time.monotonic()
        writer.submit(MODEL, "req-2", state(2), wait=False)
        writer.submit(MODEL, "req-3", state(3), wait=False)  # replaces req-2, keeps its age
        while on_disk(tmp_path) != ["req-1", "req-3"]:
            assert time.monotonic() - started < 30, "the overdue snapshot was never written"
            time.sleep(0.05)
        assert time.monotonic() - started >= 0.4
    finally:
        writer.close()
