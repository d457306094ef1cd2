"""Kafka client settings as plain values, and what every aiokafka client of streamdqn shares."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaOptions:
    """What the Kafka source, sink and admin client need, as plain values (parsed at the edge)."""

    bootstrap_servers: str
    topic: str
    group_id: str
    dlq_topic: str = ""
    snapshot_topic: str = ""
    verdicts_topic: str = ""
    client_id: str = "streamdqn"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str = ""
    sasl_plain_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    max_poll_records: int = 2000
    fetch_max_bytes: int = 8 * 1024 * 1024
    max_partition_fetch_bytes: int = 1024 * 1024
    request_timeout_ms: int = 15_000
    session_timeout_ms: int = 10_000
    group_instance_id: str = ""  # static membership (a rank of a group); empty: a dynamic member


def consumer_settings(o: KafkaOptions) -> dict[str, object]:
    """KafkaSource's consumer settings, security aside (bench/ingest.py's raw ceiling uses the same)."""
    return {
        "bootstrap_servers": o.bootstrap_servers,
        "group_id": o.group_id,
        "client_id": o.client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": o.max_poll_records,
        "fetch_max_bytes": o.fetch_max_bytes,
        "max_partition_fetch_bytes": o.max_partition_fetch_bytes,
        "request_timeout_ms": o.request_timeout_ms,
        "session_timeout_ms": o.session_timeout_ms,
        "group_instance_id": o.group_instance_id or None,
    }


def client_security(o: KafkaOptions) -> dict[str, object]:
    """aiokafka keyword arguments for TLS and SASL (shared by consumer, producer and admin client)."""
    kw: dict[str, object] = {"security_protocol": o.security_protocol}
    if o.security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = create_ssl_context(
            cafile=o.ssl_cafile or None, certfile=o.ssl_certfile or None, keyfile=o.ssl_keyfile or None
        )
    if o.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = o.sasl_mechanism
        kw["sasl_plain_username"] = o.sasl_plain_username
        kw["sasl_plain_password"] = o.sasl_plain_password
    return kw


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer, what: str) -> None:
    """Stop an aiokafka client, also when the broker is gone.

    Then aiokafka 0.14's consumer.stop() raises the CancelledError of a fetch it cancelled itself
    (Fetcher.close awaits the tasks it has just cancelled): that must not turn a clean shutdown into
    a crash, but a cancellation of our own task must still propagate.
    """
    try:
        await client.stop()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        log.warning("the Kafka %s did not stop cleanly (broker unreachable)", what)
    except (KafkaError, OSError) as exc:
        log.warning("the Kafka %s did not stop cleanly: %r", what, exc)
