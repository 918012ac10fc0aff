"""What clients can make the server hold: open connections and bytes of requests being answered."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes

TRIM_AFTER_BYTES = 64 * 2**20  # buffered since the last trim before an idle server gives memory back


def release_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps large freed buffers in its heap (its mmap threshold
    grows with the first large free): RSS stayed 2.7 GB above its start after clients that sent 14 MiB
    messages had left."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Limits:
    """Open connections and bytes held in request bodies and messages being answered, against the server's caps
    (`ServerConfig.max_connections`, `max_buffered_bytes`). Used from the event loop's thread only, so it needs
    no lock."""

    def __init__(self, max_connections: int, max_buffered: int) -> None:
        self.max_connections = max_connections
        self.max_buffered = max_buffered
        self.connections = 0
        self.buffered = 0
        self._since_trim = 0

    def reserve(self, n: int) -> bool:
        if self.buffered + n > self.max_buffered:
            return False
        self.buffered += n
        self._since_trim += n
        return True

    def release(self, n: int) -> None:
        self.buffered -= n

    def busy_connections(self) -> str | None:
        if self.connections <= self.max_connections:
            return None
        return (
            f"server busy: {self.connections - 1} connections open, the limit is {self.max_connections} "
            "(max_connections); retry later"
        )

    def busy_bytes(self, n: int) -> str:
        return (
            f"server busy: {self.buffered} bytes of requests held, {n} more would pass the limit of "
            f"{self.max_buffered} (max_buffered_mb); retry later"
        )

    def opened(self) -> None:
        self.connections += 1

    def closed(self) -> None:
        self.connections -= 1
        if self.connections == 0 and self._since_trim >= TRIM_AFTER_BYTES:
            self._since_trim = 0
            asyncio.get_running_loop().run_in_executor(None, release_memory)
