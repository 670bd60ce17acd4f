"""A Kafka topic as a source of records: each message value is one serialized tf.Example; a message with no
value (a tombstone: a compacted topic's delete by key) is handed out as None, which the dataset passes over.

confluent-kafka (librdkafka's maintained binding) reads it: partitions are assigned explicitly, each rank
taking partitions[rank::world_size], and the offsets are ours (no consumer group commits): the dataset hands
the next offset of each partition to the trainer, which keeps them in every checkpoint, so that a restarted
run resumes exactly where the checkpoint's training ended."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from ...config.kafka import KafkaInput, KafkaSecurity
from ...errors import DataError, UserError

log = logging.getLogger(__name__)

# An Item of a message: its value (None: a tombstone), where it comes from ("kafka topic T partition P") and
# its offset.
Item = tuple[bytes | None, str, int]
Offsets = dict[int, int]  # partition -> the next offset to read


def describe_starts(offsets: Offsets) -> str:
    """Where each partition starts, for a log line: its offset, or `earliest` (the client's -2: the first
    message still kept, whose offset is not known before reading)."""
    from confluent_kafka import OFFSET_BEGINNING

    starts = ("earliest" if offset == OFFSET_BEGINNING else f"offset {offset}" for offset in offsets.values())
    return ", ".join(f"partition {p} at {start}" for p, start in zip(offsets, starts, strict=True))


def partition_name(topic: str, partition: int) -> str:
    return f"kafka topic {topic} partition {partition}"


class KafkaRecords:
    """This rank's messages of `spec.topic`, in the order they arrive. With `follow` the stream never ends:
    it waits for new messages; without it, it ends when every assigned partition is read to its end.
    `resume` (partition -> next offset), from a checkpoint, overrides `spec.start` for those partitions.
    newest_timestamp: the broker time (seconds) of the newest message read, None before any."""

    def __init__(
        self,
        spec: KafkaInput,
        *,
        rank: int,
        world_size: int,
        follow: bool,
        where: str,
        resume: Offsets | None = None,
    ):
        from confluent_kafka import Consumer  # an optional dependency: pip install heavyranker[kafka]

        self.spec, self.follow, self.where = spec, follow, where
        self._broker_error: tuple[float, str] | None = None  # (since, message) while no broker answers
        self._stop = threading.Event()
        self._ends: dict[int, tuple[int, int]] = {}  # partition -> (first, end) offsets, as last heard
        self._consumer = Consumer(
            {
                "bootstrap.servers": spec.bootstrap_servers,
                "group.id": "heavyranker",  # required by the client; we never join or commit to it
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                # An offset out of the partition's range is an error (a resume checks its range first), not
                # the client's silent jump to the partition's end, which skips whatever lies between.
                "auto.offset.reset": "error",
                "error_cb": self._on_error,
                **_security(spec.security, where),
            }
        )
        every = self._partitions()
        chosen = spec.partitions if spec.partitions is not None else every
        missing = sorted(set(chosen) - set(every))
        if missing:
            raise UserError(
                f"{where}.kafka.partitions: topic {spec.topic} has no partition {missing[0]} "
                f"(it has {len(every)}: 0 to {len(every) - 1})"
            )
        chosen = sorted(chosen)
        if len(chosen) < world_size:
            raise UserError(
                f"{where}.kafka: {len(chosen)} partition(s) of topic {spec.topic} for {world_size} "
                "processes; "
                f"each process reads its own partitions, so the topic needs at least {world_size}"
            )
        self.partitions = chosen[rank::world_size]
        self.names = {partition_name(spec.topic, p): p for p in self.partitions}  # Item name -> partition
        self.offsets: Offsets = self._starts(resume or {})
        self.newest_timestamp: float | None = None
        log.info(
            "%s: kafka topic %s, partitions %s for rank %d of %d, from %s",
            where,
            spec.topic,
            self.partitions,
            rank,
            world_size,
            describe_starts(self.offsets),
        )

    def _on_error(self, error: object) -> None:
        # Called from poll: the client retries by itself; we give up after broker_timeout_seconds.
        from confluent_kafka import KafkaError

        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            if self._broker_error is None:
                self._broker_error = (time.monotonic(), error.str())
                log.warning("%s.kafka: %s; retrying", self.where, error.str())

    def _partitions(self) -> list[int]:
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + self.spec.broker_timeout_seconds
        while True:
            try:
                metadata = self._consumer.list_topics(self.spec.topic, timeout=self.spec.poll_seconds * 5)
                break
            except KafkaException as e:
                if time.monotonic() > deadline:
                    raise DataError(self._unreachable(e.args[0].str())) from None
        topic = metadata.topics.get(self.spec.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            reason = topic.error.str() if topic is not None and topic.error is not None else "no partitions"
            raise UserError(
                f"{self.where}.kafka.topic: topic {self.spec.topic!r} not found on "
                f"{self.spec.bootstrap_servers} "
                f"({reason})"
            )
        return sorted(topic.partitions)

    def _starts(self, resume: Offsets) -> Offsets:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        fresh = [p for p in self.partitions if p not in resume]
        starts = self._within_the_partitions({p: resume[p] for p in self.partitions if p in resume})
        if not fresh:
            return starts
        if self.spec.start == "earliest" or resume:
            if resume and self.spec.start != "earliest":
                # The checkpoint's run started every partition it had at a number: these are new since (or
                # newly chosen), and whatever arrived in them before this restart would be skipped.
                log.warning(
                    "%s.kafka: topic %s partition(s) %s have no offset in the checkpoint (added since, or "
                    "nothing of them was read): read from their earliest offset, not from start: %s",
                    self.where,
                    self.spec.topic,
                    fresh,
                    self.spec.start,
                )
            return starts | {p: OFFSET_BEGINNING for p in fresh}
        if self.spec.start == "latest":
            return starts | self._ends_now(fresh)
        when = datetime.fromisoformat(self.spec.start)
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        now = datetime.now(UTC)
        if when > now:  # no message is at or after it yet: starting at the end would read older ones
            raise UserError(
                f"{self.where}.kafka.start: {self.spec.start} is in the future "
                f"(now {now:%Y-%m-%dT%H:%M:%S}Z): no message is at or after it; use latest to read what "
                "arrives from now on"
            )
        millis = int(when.timestamp() * 1000)
        found = self._consumer.offsets_for_times(
            [TopicPartition(self.spec.topic, p, millis) for p in fresh],
            timeout=self.spec.broker_timeout_seconds,
        )
        timed = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        # -1: no message at or after the time: start at the end, on what arrives from now on.
        return starts | timed | self._ends_now([p for p in fresh if p not in timed])

    def _within_the_partitions(self, resumed: Offsets) -> Offsets:
        """A checkpoint's offsets, against each partition's range now: past its end is a DataError (the
        partition was recreated or truncated since); before its first offset (its messages from there were
        deleted by retention before they were read), a warning, and the partition is read from its first."""
        from confluent_kafka import TopicPartition

        ends = self._ends_now(list(resumed))
        for partition, offset in resumed.items():
            if offset > ends[partition]:
                raise DataError(
                    f"{self.where}.kafka: topic {self.spec.topic} partition {partition} ends at offset "
                    f"{ends[partition]}, before the checkpoint's next offset {offset}: it was recreated or "
                    f"truncated since, and neither reading on from {offset} (skipping its messages up to "
                    "there) nor from its start (which may train records twice) is right; to read the topic "
                    "afresh, train into a new training.save_dir (training.initial_checkpoint_dir: the old "
                    "one, for its weights)"
                )
            where = TopicPartition(self.spec.topic, partition)
            first, _ = self._consumer.get_watermark_offsets(where, self.spec.broker_timeout_seconds)
            if offset < first:
                log.warning(
                    "%s.kafka: topic %s partition %d: its messages from the checkpoint's next offset %d to "
                    "%d were deleted (retention) before they were read; reading on from %d",
                    self.where,
                    self.spec.topic,
                    partition,
                    offset,
                    first - 1,
                    first,
                )
                resumed[partition] = first
        return resumed

    def _ends_now(self, partitions: list[int]) -> Offsets:
        """The end offset of each of `partitions` now, as the high watermark of a fetch answers it: the
        end-of-partition event's offset, fetching from where ListOffsets (OFFSET_END) says the end is. Apache
        Kafka's ListOffsets answers the end itself, so the fetch reads nothing; tansu 0.6 answers the base
        offset of the partition's last record batch + 1, so the fetch reads the rest of that batch, passed
        over. A number, not OFFSET_END, so that the position holds it from the start: a restart starts there.
        """
        from confluent_kafka import OFFSET_END, KafkaError, TopicPartition

        if not partitions:
            return {}
        self._consumer.assign([TopicPartition(self.spec.topic, p, OFFSET_END) for p in partitions])
        ends: Offsets = {}
        deadline = time.monotonic() + self.spec.broker_timeout_seconds
        while len(ends) < len(partitions):
            message = self._consumer.poll(self.spec.poll_seconds)
            error = None if message is None else message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                ends.setdefault(message.partition(), message.offset())
            elif error is not None:
                raise DataError(f"{self.where}.kafka: topic {self.spec.topic}: {error.str()}")
            elif time.monotonic() > deadline:
                reason = self._broker_error[1] if self._broker_error else "no end of partition reported"
                raise DataError(self._unreachable(reason))
        self._consumer.unassign()
        return ends

    def __iter__(self) -> Iterator[Item]:
        from confluent_kafka import KafkaError, TopicPartition

        topic = self.spec.topic
        self._consumer.assign([TopicPartition(topic, p, offset) for p, offset in self.offsets.items()])
        names = {p: name for name, p in self.names.items()}
        unfinished = set(self.partitions)
        while (self.follow or unfinished) and not self._stop.is_set():
            # poll returns with the first message (consume would wait for a full set or the time out), then
            # consume takes what is already there.
            first = self._consumer.poll(self.spec.poll_seconds)
            messages = [] if first is None else [first]
            if first is not None and self.spec.max_messages_per_poll > 1:
                messages += self._consumer.consume(self.spec.max_messages_per_poll - 1, 0)
            self._note_ends()
            if not messages:
                self._check_brokers()
                continue
            self._broker_error = None
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        unfinished.discard(message.partition())
                        continue
                    if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise UserError(f"{self.where}.kafka.topic: topic {topic!r} is gone ({error.str()})")
                    if error.code() == KafkaError._AUTO_OFFSET_RESET:
                        raise DataError(
                            f"{self.where}.kafka: topic {topic} partition {message.partition()}: the next "
                            "offset is out of its range (deleted by retention before it was read, or the "
                            f"partition was recreated: {error.str()}); restart from the newest checkpoint, "
                            "which checks the range and says which"
                        )
                    raise DataError(f"{self.where}.kafka: topic {topic}: {error.str()}")
                partition, offset = message.partition(), message.offset()
                self.newest_timestamp = message.timestamp()[1] / 1000
                yield message.value(), names[partition], offset

    def _check_brokers(self) -> None:
        if self._broker_error is None:
            return
        since, message = self._broker_error
        if time.monotonic() - since > self.spec.broker_timeout_seconds:
            raise DataError(self._unreachable(message))

    def _unreachable(self, message: str) -> str:
        return (
            f"{self.where}.kafka: no broker of {self.spec.bootstrap_servers} answered for "
            f"{self.spec.broker_timeout_seconds:g} s (last error: {message}); nothing read since is lost: "
            "restart from the newest checkpoint once the brokers are back"
        )

    def lag(self, offsets: Offsets) -> int:
        """Records behind: the partitions' end offsets (as the client last heard them from the broker, after
        the latest poll) less `offsets`, the next offsets to train on (partitions absent: from their start).
        Safe from any thread: it reads what the reading thread noted."""
        ends = dict(self._ends)
        return sum(max(0, high - offsets.get(p, low)) for p, (low, high) in ends.items())

    def _note_ends(self) -> None:
        # On the reading thread: the client is not to be called from two threads at once (a call from the
        # training thread during a poll hung).
        from confluent_kafka import TopicPartition

        for p in self.partitions:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(self.spec.topic, p), cached=True)
            if high >= 0:  # negative: not heard yet
                self._ends[p] = (max(low, 0), high)

    def stop(self) -> None:
        """Ends the iteration (from another thread) within a poll."""
        self._stop.set()

    def close(self) -> None:
        self._consumer.close()


def _security(security: KafkaSecurity | None, where: str) -> dict[str, str]:
    """librdkafka's settings for `security`, with the secrets read from the environment now."""
    if security is None:
        return {}
    settings = {"security.protocol": security.protocol}
    if security.sasl_mechanism:
        settings["sasl.mechanisms"] = security.sasl_mechanism
    for key, env in (("sasl.username", security.username_env), ("sasl.password", security.password_env)):
        if env is None:
            continue
        if env not in os.environ:
            field = "username_env" if key == "sasl.username" else "password_env"
            raise UserError(f"{where}.kafka.security.{field}: the environment variable {env} is not set")
        settings[key] = os.environ[env]
    if security.ca_location:
        settings["ssl.ca.location"] = security.ca_location
    return settings
