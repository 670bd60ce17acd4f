"""`<data section>.kafka:` — a Kafka topic whose message values are serialized tf.Examples."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from .base import Count, Float, NonNegative, StrictModel


class KafkaSecurity(StrictModel):
    """How the client authenticates. Secrets are read from the environment variables named here, when the
    topic is opened: a YAML file never holds them."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "SASL_SSL", description="librdkafka's security.protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="librdkafka's sasl.mechanisms; none: no SASL."
    )
    username_env: str | None = Field(
        None, description="The NAME of the environment variable holding the user."
    )
    password_env: str | None = Field(
        None, description="The NAME of the environment variable holding the password."
    )
    ca_location: str | None = Field(
        None, description="A CA certificate file (PEM) for SSL; default: the system's."
    )


class KafkaInput(StrictModel):
    """Reads the messages of `topic`; each rank takes partitions[rank::world_size] and the offsets are kept in
    our checkpoints (no consumer group commits)."""

    bootstrap_servers: str = Field(description="host:port[,host:port...] of the brokers.")
    topic: str = Field(
        min_length=1, description="The topic; each message value is one serialized tf.Example."
    )
    partitions: list[NonNegative] | None = Field(
        None, description="The partitions read; default: all of them."
    )
    start: str = Field(
        "earliest",
        description="Where a run without a checkpoint starts: earliest, latest, or an ISO timestamp "
        "(2026-01-31T05:00:00+00:00; without an offset, UTC).",
    )
    poll_seconds: Float = Field(1.0, gt=0.0, le=5.0, description="How long one poll waits for messages.")
    broker_timeout_seconds: Float = Field(
        30.0, gt=0.0, description="How long the brokers may stay unreachable before reading fails."
    )
    max_messages_per_poll: Count = Field(1000, le=100_000, description="Messages taken by one poll at most.")
    security: KafkaSecurity | None = Field(None, description="Authentication; default: none (PLAINTEXT).")

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        if value in ("earliest", "latest"):
            return value
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise PydanticCustomError(
                "start",
                "start is earliest, latest or an ISO timestamp such as 2026-01-31T05:00",
                {"v": value},
            ) from None
        return value
