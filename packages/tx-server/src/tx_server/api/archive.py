"""Checkpoint archives: signed download links and a streamed, uncompressed tar.

Why signed links: the archive URL is handed to tools that fetch it without the API key
(``urllib.request.urlretrieve`` in Tinker's docs), like an object store's pre-signed URL. A
token is ``base64url(json) + "." + base64url(HMAC-SHA256)`` over the checkpoint path, the
tenant it was issued to and its expiry; it grants exactly that download until then. At
download time the checkpoint must *still* be readable by that tenant, so unpublishing or
deleting a checkpoint revokes the links handed out for it.

Why plain tar (not tar.gz): safetensors barely compress, and without compression the length is
known up front (``Content-Length``) and the archive is produced file by file straight from
disk, never in memory. ``tarfile.open(path)`` reads it either way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tx_server.errors import TxServerError

__all__ = ["ArchiveLinkError", "ArchiveSigner", "TarStream", "tar_stream"]

_BLOCK = 512
_CHUNK = 1 << 20


class ArchiveLinkError(TxServerError):
    """The download token is malformed, forged or expired (answered 403)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class ArchiveGrant:
    """What a valid token allows: one checkpoint, read as one tenant."""

    tinker_path: str
    tenant_id: str
    expires: float


class ArchiveSigner:
    """Issues and checks download tokens with one HMAC key."""

    def __init__(self, key: bytes | None, ttl_seconds: float) -> None:
        """``key`` None: a random key, so links die with the process (documented setting)."""
        self._key = key if key is not None else secrets.token_bytes(32)
        self.ttl_seconds = ttl_seconds

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def issue(self, tinker_path: str, tenant_id: str) -> tuple[str, float]:
        """A token for ``tinker_path`` as ``tenant_id`` and its expiry (unix seconds)."""
        expires = time.time() + self.ttl_seconds
        claims = json.dumps({"p": tinker_path, "t": tenant_id, "e": expires}, sort_keys=True)
        body = claims.encode("utf-8")
        return f"{_b64(body)}.{_b64(self._mac(body))}", expires

    def check(self, token: str) -> ArchiveGrant:
        """The grant of a genuine, unexpired token; ArchiveLinkError otherwise."""
        try:
            body_text, mac_text = token.split(".", 1)
            body, mac = _unb64(body_text), _unb64(mac_text)
        except (ValueError, binascii.Error):
            raise ArchiveLinkError("malformed archive download token") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise ArchiveLinkError("invalid archive download token (bad signature)")
        claims = json.loads(body)
        grant = ArchiveGrant(str(claims["p"]), str(claims["t"]), float(claims["e"]))
        if grant.expires < time.time():
            raise ArchiveLinkError("the archive download link has expired; request a new one")
        return grant


@dataclass(frozen=True)
class TarStream:
    """A tar archive's exact length and a generator of its bytes."""

    length: int
    chunks: Iterator[bytes]


def _members(root: Path) -> list[tuple[tarfile.TarInfo, Path | None]]:
    members: list[tuple[tarfile.TarInfo, Path | None]] = []
    for path in sorted(root.rglob("*")):
        info = tarfile.TarInfo(path.relative_to(root).as_posix())
        stat = path.stat()
        info.mtime = int(stat.st_mtime)
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            members.append((info, None))
        elif path.is_file():
            info.size, info.mode = stat.st_size, 0o644
            members.append((info, path))
    return members


def _padding(size: int) -> int:
    return -size % _BLOCK


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of ``path``; a file that shrank mid-download aborts the stream."""
    remaining = size
    with path.open("rb") as f:
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{path} changed while it was being archived")
            remaining -= len(chunk)
            yield chunk


def tar_stream(root: Path) -> TarStream:
    """A POSIX (PAX) tar of the files under ``root``, names relative to ``root``."""
    members = [(info.tobuf(format=tarfile.PAX_FORMAT), info, src) for info, src in _members(root)]
    length = sum(len(h) + i.size + _padding(i.size) for h, i, _ in members) + 2 * _BLOCK

    def generate() -> Iterator[bytes]:
        for header, info, src in members:
            yield header
            if src is not None and info.size:
                yield from _file_chunks(src, info.size)
                yield b"\0" * _padding(info.size)
        yield b"\0" * (2 * _BLOCK)

    return TarStream(length, generate())
