"""A plain producer for tools that write telemetry or verdicts to a topic (the demo, benchmarks)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

from aiokafka import AIOKafkaProducer


class RecordProducer:
    """Sends records to topics; `async with` starts and stops it, `flush()` waits for acknowledgements."""

    def __init__(self, bootstrap_servers: str, *, linger_ms: int = 5) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=linger_ms,
                                          max_request_size=16 * 1024 * 1024)
        self._pending: list[asyncio.Future[object]] = []

    async def __aenter__(self) -> RecordProducer:
        await self._producer.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._producer.stop()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        self._pending.append(await self._producer.send(topic, value, key=key, headers=list(headers)))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)
