"""The gateway's asyncio connection to one nanny (see gateway.nanny.process and .wire)."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from typing import Any

from gateway.nanny.wire import FrameDecoder, WireError, encode_frame

READ_CHUNK = 64 * 1024


class NannyGone(Exception):
    """The connection to the nanny closed (or it spoke nonsense, which ends it too)."""


class NannyLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder()
        self._frames: deque[tuple[dict[str, Any], bytes]] = deque()

    @classmethod
    async def connect(cls, socket_path: Path, timeout: float = 2.0) -> NannyLink:
        """Connect; OSError when no nanny listens there, TimeoutError when it does not answer."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path)), timeout
        )
        return cls(reader, writer)

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._writer.is_closing():
            raise NannyGone("the link to the nanny is closed")
        try:
            self._writer.write(encode_frame(header, payload))
            await self._writer.drain()  # back-pressure: a nanny busy writing stdin slows us
        except ConnectionError as exc:
            raise NannyGone(f"the nanny went away: {exc}") from None

    async def receive(self) -> tuple[dict[str, Any], bytes]:
        """The next frame from the nanny; NannyGone once the connection is over."""
        while not self._frames:
            try:
                data = await self._reader.read(READ_CHUNK)
            except ConnectionError as exc:
                raise NannyGone(f"the nanny went away: {exc}") from None
            if not data:
                raise NannyGone("the nanny closed the connection")
            try:
                self._frames.extend(self._decoder.feed(data))
            except WireError as exc:
                self._writer.close()
                raise NannyGone(f"the nanny sent a malformed frame: {exc}") from None
        return self._frames.popleft()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
