"""Kafka: the telemetry consumer, the producer for dead letters and announcements, topic admin, a plain
producer for tools, and the embedded tansu broker. The only package that imports aiokafka."""

from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker
from streamdqn.kafka.options import KafkaOptions, client_security, consumer_settings
from streamdqn.kafka.producer import RecordProducer
from streamdqn.kafka.sink import KafkaSink
from streamdqn.kafka.source import KafkaSource

__all__ = ["EmbeddedBroker", "KafkaOptions", "KafkaSink", "KafkaSource", "RecordProducer", "client_security",
           "consumer_settings", "ensure_topics"]
