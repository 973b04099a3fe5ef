"""SDK 0.38 spells client creation as a future: `sc.create_lora_training_client(...).result()`.

The official SDK returns a "backcompat future" that resolves to the client (and, deprecated,
proxies its methods). tx-client returns the client itself, so both spellings must work on it:
`.result()` and `await` hand back the client unchanged. Without this, every script written for
the current SDK fails on its first line after switching the import.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Self


class ResolvedClientFuture:
    """Mixin: a client that also behaves as its own already-completed creation future."""

    def result(self, timeout: float | None = None) -> Self:
        """The client itself (creation already finished when the method returned)."""
        del timeout
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        async def resolved() -> Self:
            return self

        return resolved().__await__()
