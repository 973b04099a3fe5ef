"""Checkpoint archive links: 302 to a signed URL that streams the checkpoint directory as tar.

No worker is needed: the session and run are created through the API, and the checkpoint is
registered the way the worker registers one (files first, then its ``checkpoints`` row), with
file sizes chosen to hit the tar edge cases (empty, exactly one block, odd sizes, > 1 chunk).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tx_server.api.archive import ArchiveLinkError, ArchiveSigner
from tx_server.auth import tenant_of_key
from tx_server.db.database import Database
from tx_server.db.models import CheckpointRow
from tx_server.testing import API_KEY, RunningServer
from tx_server.worker.storage import dir_size

KEY_B = "tml-tx-server-tests-key-0002"
FILES = {
    "adapter_model.safetensors": 1_500_003,
    "adapter_config.json": 311,
    "metadata.json": 512,
    "empty.txt": 0,
    "nested/dir/optimizer.bin": 70_001,
}


def _post(server: RunningServer, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/{path}", json=body, headers={"X-API-Key": API_KEY}, timeout=30
    )


def make_checkpoint(server: RunningServer, name: str = "step-1") -> tuple[str, Path]:
    """A real run of the API_KEY tenant and a checkpoint of it: ``(tinker_path, directory)``."""
    session = _post(server, "create_session", {"sdk_version": "0.38.0"}).json()
    body = {"session_id": session["session_id"], "model_seq_id": 0, "base_model": "Qwen/Qwen3-0.6B"}
    model_id = _post(server, "create_model", body).json()["model_id"]
    root = Path(server.settings.checkpoint_root) / model_id / "weights" / name
    for rel, size in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    tinker_path = f"tinker://{model_id}/weights/{name}"
    db = Database(server.settings.database_url)
    with db.write() as s:
        s.add(
            CheckpointRow(
                model_id=model_id,
                tenant_id=tenant_of_key(API_KEY),
                checkpoint_type="training",
                name=name,
                tinker_path=tinker_path,
                storage_path=str(root),
                size_bytes=dir_size(root),
            )
        )
    db.dispose()
    return tinker_path, root


def _archive_url(server: RunningServer, tinker_path: str) -> str:
    run_id, rest = tinker_path.removeprefix("tinker://").split("/", 1)
    return f"{server.url}/api/v1/training_runs/{run_id}/checkpoints/{rest}/archive"


def test_archive_link_streams_the_checkpoint_as_tar(server: RunningServer) -> None:
    tinker_path, root = make_checkpoint(server)
    response = httpx.get(_archive_url(server, tinker_path), headers={"X-API-Key": API_KEY})
    assert response.status_code == 302
    link = response.headers["location"]
    assert response.json()["url"] == link
    assert "GMT" in response.headers["expires"]
    download = httpx.get(link, timeout=60)  # no API key: the signed link is the credential
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/x-tar"
    assert int(download.headers["content-length"]) == len(download.content)
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert got == {rel: (root / rel).read_bytes() for rel in FILES}


def test_following_the_redirect_downloads_the_same_bytes(server: RunningServer) -> None:
    tinker_path, root = make_checkpoint(server)
    response = httpx.get(
        _archive_url(server, tinker_path),
        headers={"X-API-Key": API_KEY},
        follow_redirects=True,
        timeout=60,
    )
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(root.parent / "extracted", filter="data")
    for rel in FILES:
        assert (root.parent / "extracted" / rel).read_bytes() == (root / rel).read_bytes()


def test_archive_is_tenant_protected(server: RunningServer) -> None:
    tinker_path, _ = make_checkpoint(server)
    url = _archive_url(server, tinker_path)
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": KEY_B}).status_code == 404
    link = httpx.get(url, headers={"X-API-Key": API_KEY}).headers["location"]
    body, mac = link.rsplit("/", 1)[1].split(".")
    forged = f"{link.rsplit('/', 1)[0]}/{body}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}"
    assert httpx.get(forged).status_code == 403
    assert httpx.get(f"{link.rsplit('/', 1)[0]}/garbage").status_code == 403


def test_deleted_checkpoint_revokes_its_links(server: RunningServer) -> None:
    tinker_path, _ = make_checkpoint(server)
    url = _archive_url(server, tinker_path)
    link = httpx.get(url, headers={"X-API-Key": API_KEY}).headers["location"]
    assert httpx.delete(url.removesuffix("/archive"), headers={"X-API-Key": API_KEY}).is_success
    response = httpx.get(link)
    assert response.status_code == 404
    assert "unknown checkpoint" in response.json()["detail"]


def test_bad_kind_or_name_is_a_clear_400(server: RunningServer) -> None:
    tinker_path, _ = make_checkpoint(server)
    run_id = tinker_path.removeprefix("tinker://").split("/")[0]
    base = f"{server.url}/api/v1/training_runs/{run_id}/checkpoints"
    response = httpx.get(f"{base}/bogus/step-1/archive", headers={"X-API-Key": API_KEY})
    assert response.status_code == 400
    assert "checkpoint kind" in response.json()["detail"]


def test_signer_rejects_expired_and_foreign_tokens() -> None:
    signer = ArchiveSigner(b"k" * 32, ttl_seconds=0.05)
    token, expires = signer.issue("tinker://run:train:0/weights/a", "tenant-a")
    assert signer.check(token).tenant_id == "tenant-a"
    assert expires > time.time()
    with pytest.raises(ArchiveLinkError, match="bad signature"):
        ArchiveSigner(b"x" * 32, 60).check(token)
    time.sleep(0.1)
    with pytest.raises(ArchiveLinkError, match="expired"):
        signer.check(token)
