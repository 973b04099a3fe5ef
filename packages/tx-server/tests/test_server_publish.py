"""Publishing and TTL of checkpoints through the unmodified tinker SDK 0.38.0, two tenants.

Live API + worker thread serving the tx-engine kit's tiny Qwen3 as ``Qwen/Qwen3-8B`` (as in
``test_server_training_sdk.py``). Tenant A trains and saves; tenant B (another API key) may
read A's checkpoint by path only while it is published: weights_info, create-via-load,
sampling and the archive link. The oracle for "B really got A's weights" is A's own forward
pass and greedy samples.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tx_server.settings import EngineSettings
from tx_server.testing import API_KEY, RunningServer, run_hub_model_server

BASE = "Qwen/Qwen3-8B"
KEY_B = "tml-tx-server-tests-key-0002"
TOKENS = [5, 17, 42, 9, 101, 77, 3, 250, 64, 12]
GREEDY = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
PROMPT = types.ModelInput.from_ints(TOKENS[:3])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # The sampling tests' engine shapes, so a full run can reuse their jax compilations.
    engine = EngineSettings(
        max_lora_rank=16, max_lora_adapters=12, max_seq_len=64, sample_tokens_per_batch=512
    )
    root = tmp_path_factory.mktemp("publish")
    overrides = {"checkpoint_min_ttl_seconds": 1, "maintenance_interval_seconds": 0.5}
    with run_hub_model_server(root, base_models=[BASE], engine=engine, **overrides) as server:
        yield server


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=TOKENS[1:], dtype="int64"),
            "weights": types.TensorData(data=[1.0] * (len(TOKENS) - 1), dtype="float32"),
        },
    )


def _logprobs(tc: tinker.TrainingClient) -> np.ndarray:
    """Per-token logprobs of the model (forward_backward: its program is compiled already)."""
    out = tc.forward_backward([_datum()], "cross_entropy").result(timeout=120)
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, np.float64)


def _trained(sc: tinker.ServiceClient) -> tinker.TrainingClient:
    tc = sc.create_lora_training_client(BASE, rank=4, seed=3).result(timeout=120)
    for _ in range(3):
        tc.forward_backward([_datum()], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
    return tc


def _greedy(sampler: tinker.SamplingClient) -> list[int]:
    result = sampler.sample(PROMPT, num_samples=1, sampling_params=GREEDY).result(timeout=120)
    return list(result.sequences[0].tokens)


def _archive_files(server: RunningServer, key: str, tinker_path: str) -> dict[str, bytes]:
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    url = f"{server.url}/api/v1/training_runs/{parsed.training_run_id}/checkpoints/"
    url += f"{parsed.checkpoint_id}/archive"
    response = httpx.get(url, headers={"X-API-Key": key}, timeout=30)
    assert response.status_code == 302, response.text
    tar_bytes = httpx.get(response.headers["location"], timeout=60).content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _files_on_disk(server: RunningServer, tinker_path: str) -> dict[str, bytes]:
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    segment, name = parsed.checkpoint_id.split("/")
    root = Path(server.settings.checkpoint_root) / parsed.training_run_id / segment / name
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_published_checkpoint_is_readable_by_another_tenant_until_unpublished(
    live: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc_a = open_service_client(live.url, API_KEY)
    sc_b = open_service_client(live.url, KEY_B)
    rest_a = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    rest_b = tinker.RestClient(base_url=live.url, api_key=KEY_B)
    tc = _trained(sc_a)
    state = tc.save_state("shared").result(timeout=120).path
    sampler_path = tc.save_weights_for_sampler("shared-s").result(timeout=120).path
    own_tokens = _greedy(sc_a.create_sampling_client(model_path=sampler_path).result())

    with pytest.raises(tinker.NotFoundError):
        rest_b.get_weights_info_by_tinker_path(state).result(timeout=30)
    with pytest.raises(tinker.NotFoundError):  # only the owner may publish
        rest_b.publish_checkpoint_from_tinker_path(state).result(timeout=30)

    rest_a.publish_checkpoint_from_tinker_path(state).result(timeout=30)
    rest_a.publish_checkpoint_from_tinker_path(sampler_path).result(timeout=30)
    listed = rest_a.list_checkpoints(tc.model_id).result(timeout=30).checkpoints
    assert {c.checkpoint_id: c.public for c in listed} == {
        "weights/shared": True,
        "sampler_weights/shared-s": True,
    }
    info = rest_b.get_weights_info_by_tinker_path(state).result(timeout=30)
    assert (info.base_model, info.lora_rank) == (BASE, 4)
    loaded = sc_b.create_training_client_from_state(state).result(timeout=120)
    np.testing.assert_allclose(_logprobs(loaded), _logprobs(tc), rtol=1e-5, atol=1e-6)
    sampler_b = sc_b.create_sampling_client(model_path=sampler_path).result(timeout=60)
    assert _greedy(sampler_b) == own_tokens
    assert _archive_files(live, KEY_B, sampler_path) == _files_on_disk(live, sampler_path)
    with pytest.raises(tinker.NotFoundError):  # public is readable, not listable by others
        rest_b.list_checkpoints(tc.model_id).result(timeout=30)

    rest_a.unpublish_checkpoint_from_tinker_path(state).result(timeout=30)
    rest_a.unpublish_checkpoint_from_tinker_path(sampler_path).result(timeout=30)
    with pytest.raises(tinker.NotFoundError):
        rest_b.get_weights_info_by_tinker_path(state).result(timeout=30)
    with pytest.raises(tinker.RequestFailedError, match="unknown checkpoint"):
        _greedy(sampler_b)  # the sampler B created meanwhile is revoked too
    with pytest.raises(tinker.NotFoundError):
        sc_b.create_training_client_from_state(state).result(timeout=60)
    assert _greedy(sc_a.create_sampling_client(model_path=sampler_path).result()) == own_tokens
    assert all(not c.public for c in rest_a.list_checkpoints(tc.model_id).result().checkpoints)


def test_ttl_on_save_expires_lists_and_deletes(
    live: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(live.url, API_KEY)
    rest = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    tc = sc.create_lora_training_client(BASE, rank=4).result(timeout=120)
    before = datetime.now(UTC)
    short = tc.save_state("short", ttl_seconds=3).result(timeout=120).path
    kept = tc.save_weights_for_sampler("kept").result(timeout=120).path
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    expires_at = listed[short].expires_at
    assert expires_at is not None
    assert 2.0 < (expires_at - before).total_seconds() < 60
    assert listed[kept].expires_at is None
    assert rest.get_weights_info_by_tinker_path(short).result(timeout=30).base_model == BASE
    on_disk = Path(live.settings.checkpoint_root) / tc.model_id / "weights" / "short"
    assert on_disk.is_dir()

    deadline = time.monotonic() + 30
    while on_disk.exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not on_disk.exists(), "the maintenance task did not delete the expired checkpoint"
    remaining = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert remaining == [kept]
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(short).result(timeout=30)
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        rest.set_checkpoint_ttl_from_tinker_path(kept, 11 * 365 * 24 * 3600).result(timeout=30)


def test_set_ttl_then_remove_then_expire(
    live: RunningServer, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(live.url, API_KEY)
    rest = tinker.RestClient(base_url=live.url, api_key=API_KEY)
    rest_b = tinker.RestClient(base_url=live.url, api_key=KEY_B)
    tc = sc.create_lora_training_client(BASE, rank=4).result(timeout=120)
    path = tc.save_weights_for_sampler("ttl-put").result(timeout=120).path

    def expiry() -> datetime | None:
        (row,) = rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints
        return row.expires_at

    with pytest.raises(tinker.NotFoundError):  # only the owner sets a TTL
        rest_b.set_checkpoint_ttl_from_tinker_path(path, 3600).result(timeout=30)
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result(timeout=30)
    first = expiry()
    assert first is not None
    assert 3500 < (first - datetime.now(UTC)).total_seconds() <= 3600
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result(timeout=30)
    assert expiry() is None
    rest.set_checkpoint_ttl_from_tinker_path(path, 1).result(timeout=30)
    on_disk = Path(live.settings.checkpoint_root) / tc.model_id / "sampler_weights" / "ttl-put"
    deadline = time.monotonic() + 30
    while on_disk.exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not on_disk.exists()
    assert rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints == []
