"""The Kafka source against a real broker (tansu on loopback, tests/kafka_broker.py)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from heavyranker.data.dataset import RecapDataset
from heavyranker.errors import DataError, UserError

from ..kafka_broker import broker, running_broker  # noqa: F401  (broker: a fixture)
from ..kafka_data import example, kafka_config, produce_messages

BATCH = 8


def ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b.features["meta__tweet_id"].reshape(-1).tolist()]


def produce_ids(broker, topic: str, by_partition: dict[int, range]) -> None:  # noqa: F811
    broker.produce(topic, {p: [example(i) for i in r] for p, r in by_partition.items()})


def dataset(config, **kwargs) -> RecapDataset:
    return RecapDataset(config.train_data, where="train_data", **kwargs)


def test_reads_every_message_once_and_each_partition_in_order(broker, tmp_path):  # noqa: F811
    broker.create_topic("all", 3)
    produce_ids(broker, "all", {0: range(0, 20), 1: range(100, 113), 2: range(200, 207)})
    config = kafka_config(broker.bootstrap, "all", tmp_path, f"train_data.global_batch_size={BATCH}")
    with dataset(config) as data:
        read = ids(data)
        position = data.position()
    assert sorted(read) == [*range(0, 20), *range(100, 113), *range(200, 207)]
    for first in (0, 100, 200):
        in_partition = [i for i in read if first <= i < first + 100]
        assert in_partition == sorted(in_partition)
    assert position == {0: 20, 1: 13, 2: 7}  # the next offset of each partition


def test_resumes_from_a_position_and_reads_only_the_rest(broker, tmp_path):  # noqa: F811
    broker.create_topic("resume", 2)
    produce_ids(broker, "resume", {0: range(0, 10), 1: range(100, 110)})
    config = kafka_config(broker.bootstrap, "resume", tmp_path, f"train_data.global_batch_size={BATCH}")
    with dataset(config) as data:
        data.resume({0: 4, 1: 7})
        read = ids(data)
    assert sorted(read) == [*range(4, 10), *range(107, 110)]


def test_ranks_take_their_own_partitions(broker, tmp_path):  # noqa: F811
    broker.create_topic("ranks", 3)
    produce_ids(broker, "ranks", {0: range(0, 8), 1: range(100, 108), 2: range(200, 208)})
    config = kafka_config(broker.bootstrap, "ranks", tmp_path, f"train_data.global_batch_size={2 * BATCH}")
    with dataset(config, rank=0, world_size=2) as first, dataset(config, rank=1, world_size=2) as second:
        assert sorted(ids(first)) == [*range(0, 8), *range(200, 208)]  # partitions 0 and 2
        assert sorted(ids(second)) == list(range(100, 108))


def test_a_position_of_two_ranks_is_read_on_by_one(broker, tmp_path):  # noqa: F811
    """A restart with another --nproc: each partition goes on from its offset in the 2 ranks' position,
    whichever rank read it (the partitions without one, from the start)."""
    broker.create_topic("regrouped", 3)
    produce_ids(broker, "regrouped", {0: range(0, 8), 1: range(100, 108), 2: range(200, 208)})
    config = kafka_config(broker.bootstrap, "regrouped", tmp_path, f"train_data.global_batch_size={BATCH}")
    first, position = [], {}
    for rank in (0, 1):
        with dataset(config, rank=rank, world_size=2, follow=True) as data:
            first += ids([next(iter(data))])
            position |= data.position()
    with dataset(config) as data:
        data.resume(position)
        rest = ids(data)
    assert sorted(first + rest) == [*range(0, 8), *range(100, 108), *range(200, 208)]


def test_chosen_partitions(broker, tmp_path):  # noqa: F811
    broker.create_topic("chosen", 2)
    produce_ids(broker, "chosen", {0: range(0, 5), 1: range(100, 105)})
    config = kafka_config(
        broker.bootstrap, "chosen", tmp_path, "train_data.global_batch_size=4", partitions=[1]
    )
    with dataset(config) as data:
        assert sorted(ids(data)) == list(range(100, 105))


def test_start_at_a_time(broker, tmp_path):  # noqa: F811
    """The messages from a time on."""
    broker.create_topic("timed", 1)
    produce_ids(broker, "timed", {0: range(0, 5)})
    time.sleep(0.05)  # the broker stamps messages in milliseconds: the next ones come strictly after
    start = datetime.now(UTC)
    time.sleep(0.05)
    produce_ids(broker, "timed", {0: range(5, 9)})
    config = kafka_config(
        broker.bootstrap, "timed", tmp_path, "train_data.global_batch_size=2", start=start.isoformat()
    )
    with dataset(config) as data:
        assert ids(data) == list(range(5, 9))


def test_start_latest_reads_only_what_comes_after_the_start(broker, tmp_path):  # noqa: F811
    """start: latest skips what the topic holds when reading starts, and reads what comes after exactly once;
    the position holds where each partition started, so a restart before any of it is trained starts there.
    Each partition's earlier messages are produced as one record batch, whose end tansu 0.6's ListOffsets
    answers as 1 (the batch's base offset + 1)."""
    broker.create_topic("latest", 2)
    produce_ids(broker, "latest", {0: range(0, 10), 1: range(100, 105)})
    config = kafka_config(
        broker.bootstrap, "latest", tmp_path, f"train_data.global_batch_size={BATCH}", start="latest"
    )
    with dataset(config, follow=True) as data:
        batches = iter(data)  # the partitions' ends are resolved here
        assert data.position() == {0: 10, 1: 5}
        produce_ids(broker, "latest", {0: range(10, 14), 1: range(105, 109)})
        read = ids([next(batches)])
        assert sorted(read) == [*range(10, 14), *range(105, 109)]
        produce_ids(broker, "latest", {0: range(14, 22)})
        assert ids([next(batches)]) == list(range(14, 22))  # nothing read twice in between
        assert data.position() == {0: 22, 1: 9}


def test_a_message_that_is_not_a_tf_example(broker, tmp_path):  # noqa: F811
    broker.create_topic("bad", 1)
    broker.produce("bad", {0: [example(0), example(1), b"\xff\xff not a tf.Example", example(3)]})
    config = kafka_config(broker.bootstrap, "bad", tmp_path, "train_data.global_batch_size=2")
    with dataset(config) as data, pytest.raises(DataError) as error:
        list(data)
    message = str(error.value)
    assert "\n" not in message
    assert "kafka topic bad partition 0: offset 2: not a tf.Example" in message

    skipping = kafka_config(
        broker.bootstrap,
        "bad",
        tmp_path,
        "train_data.global_batch_size=2",
        "train_data.ignore_data_errors=true",
    )
    with dataset(skipping) as data:
        assert ids(data) == [0, 1, 3]
        assert data.counts()["skipped_records"] == 1
        assert data.position() == {0: 4}  # the skipped message is behind us too


def test_a_topic_that_does_not_exist(broker, tmp_path):  # noqa: F811
    config = kafka_config(broker.bootstrap, "nowhere", tmp_path, "train_data.global_batch_size=2")
    with dataset(config) as data, pytest.raises(UserError) as error:
        list(data)
    assert "\n" not in str(error.value)
    assert "train_data.kafka.topic: topic 'nowhere' not found" in str(error.value)


def test_a_partition_that_does_not_exist(broker, tmp_path):  # noqa: F811
    broker.create_topic("two", 2)
    config = kafka_config(broker.bootstrap, "two", tmp_path, "train_data.global_batch_size=2", partitions=[5])
    with dataset(config) as data, pytest.raises(UserError, match="has no partition 5"):
        list(data)


def test_a_broker_that_goes_away(tmp_path):
    """Reading retries for broker_timeout_seconds, then fails in one line; the position names only what was
    handed out, so a restart reads the rest."""
    with running_broker() as gone:
        gone.create_topic("gone", 1)
        produce_ids(gone, "gone", {0: range(0, 6)})
        config = kafka_config(
            gone.bootstrap, "gone", tmp_path, "train_data.global_batch_size=2", broker_timeout_seconds=3
        )
        with dataset(config, follow=True) as data:
            batches = iter(data)
            first = ids([next(batches)])
            gone.stop()
            with pytest.raises(DataError) as error:
                while True:
                    next(batches)
            position = data.position()
    message = str(error.value)
    assert "\n" not in message
    assert f"train_data.kafka: no broker of {gone.bootstrap} answered for 3 s" in message
    assert first == [0, 1]
    assert position[0] in (2, 4, 6)  # whole batches, each before the broker went
    assert position[0] >= 2


def test_the_secrets_come_from_the_environment(broker, tmp_path, monkeypatch):  # noqa: F811
    broker.create_topic("secret", 1)
    security = (
        "{protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN, username_env: KAFKA_U, password_env: KAFKA_P}"
    )
    config = kafka_config(
        broker.bootstrap,
        "secret",
        tmp_path,
        "train_data.global_batch_size=2",
        f"train_data.kafka.security={security}",
    )
    monkeypatch.delenv("KAFKA_U", raising=False)
    with dataset(config) as data, pytest.raises(UserError) as error:
        list(data)
    assert (
        str(error.value)
        == "train_data.kafka.security.username_env: the environment variable KAFKA_U is not set"
    )


def test_data_dump_reads_up_to_batches(broker, tmp_path):  # noqa: F811
    from heavyranker.data.dump import dump_batches

    broker.create_topic("dump", 1)
    produce_ids(broker, "dump", {0: range(0, 10)})
    config = kafka_config(broker.bootstrap, "dump", tmp_path, "train_data.global_batch_size=4")
    out = tmp_path / "dump.npz"
    dump_batches(config.train_data, seed=0, batches=2, out=str(out))
    assert np.load(out)["meta__tweet_id"].reshape(-1).tolist() == list(range(8))
    dump_batches(config.train_data, seed=0, batches=5, out=str(out))  # the topic ends first
    assert np.load(out)["meta__tweet_id"].reshape(-1).tolist() == list(range(8))  # full batches (training's)


def test_files_and_a_topic_are_read_together_in_follow_mode(broker, tmp_path):  # noqa: F811
    """train_data with kafka and an inputs glob, followed: every record of both, each stream in its own
    order; the position holds the files' and the partition's, and a dataset resumed from it reads only what
    came after."""
    from .test_follow import write_file

    broker.create_topic("mixed", 1)
    files = tmp_path / "files"
    config = kafka_config(
        broker.bootstrap,
        "mixed",
        tmp_path,
        f"train_data.global_batch_size={BATCH}",
        f"train_data.inputs={files}/*.gz",
        "train_data.follow_poll_seconds=0.1",
    )
    write_file(files / "a.gz", range(0, 8))
    produce_ids(broker, "mixed", {0: range(100, 108)})
    with dataset(config, follow=True) as data:
        batches = iter(data)
        read = ids([next(batches), next(batches)])
        write_file(files / "b.gz", range(8, 12))
        produce_ids(broker, "mixed", {0: range(108, 112)})
        read += ids([next(batches)])
        position = data.position()
    assert sorted(read) == [*range(0, 12), *range(100, 112)]
    assert [i for i in read if i < 100] == list(range(0, 12))  # the files' order
    assert [i for i in read if i >= 100] == list(range(100, 112))  # the partition's
    assert position[0] == 12
    assert {path: (e["next"], e["done"]) for path, e in position.items() if path != 0} == {
        f"{files}/a.gz": (8, True),
        f"{files}/b.gz": (4, True),
    }

    write_file(files / "c.gz", range(12, 16))
    produce_ids(broker, "mixed", {0: range(112, 116)})
    with dataset(config, follow=True) as data:
        data.resume(position)
        assert sorted(ids([next(iter(data))])) == [*range(12, 16), *range(112, 116)]


def test_files_and_a_topic_are_refused_outside_follow_mode(broker, tmp_path):  # noqa: F811
    from heavyranker.data.sources.follow import follow_sources

    config = kafka_config(broker.bootstrap, "x", tmp_path, f"train_data.inputs={tmp_path}/*.gz")
    with pytest.raises(UserError) as error:
        dataset(config)
    message = str(error.value)
    assert message == (
        f"train_data: kafka together with inputs {tmp_path}/*.gz is read only in follow mode "
        "(training.follow, train --follow, on train_data); elsewhere keep one of them"
    )
    with pytest.raises(UserError, match="^train_data: kafka together with inputs"):
        follow_sources(config)  # train without --follow
    config.training.follow = True
    follow_sources(config)


def test_a_validation_split_with_files_and_a_topic_is_refused(tmp_path):
    from heavyranker.config import ConfigError, load_config

    from ..conftest import CONFIGS

    topic = "{bootstrap_servers: 'localhost:9092', topic: t}"
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "local_small.yaml", [f"validation_data.validation.kafka={topic}"])
    assert error.value.problems == [
        (
            "validation_data.validation.kafka",
            "a topic together with files is read only by train_data in follow mode: keep one of them",
        )
    ]


def with_tombstones(count: int, tombstone) -> list[int | None]:
    """Ids 0..count-1, None (a tombstone) where tombstone(i)."""
    return [None if tombstone(i) else i for i in range(count)]


def test_tombstones_are_skipped_counted_and_passed_over_by_the_position(broker, tmp_path):  # noqa: F811
    """A message with no value (a delete by key) is not a record: it is not decoded or trained, it is counted
    (kafka_tombstones_skipped), and the position goes past it, a trailing one included, so that the lag is
    0 at the end and a dataset resumed there reads (and counts) nothing again. Partition 1 holds
    tombstones alone: its runs make no batch, which is no error."""
    broker.create_topic("deletes", 2)
    first = with_tombstones(23, lambda i: i % 3 == 1 or i == 22)
    produce_messages(broker.bootstrap, "deletes", 0, first)
    produce_messages(broker.bootstrap, "deletes", 1, [None] * 9)
    config = kafka_config(broker.bootstrap, "deletes", tmp_path, "train_data.global_batch_size=4")
    with dataset(config) as data:
        read = ids(data)
        counts, position = data.counts(), data.position()
    assert sorted(read) == [i for i in first if i is not None]
    assert counts["kafka_tombstones_skipped"] == first.count(None) + 9
    assert counts["defaults_filled"] == 0  # no empty tf.Example was made of them
    assert counts["kafka_lag_records"] == 0
    assert position == {0: 23, 1: 9}
    with dataset(config) as again:
        again.resume(position)
        assert ids(again) == []
        assert again.counts()["kafka_tombstones_skipped"] == 0


def test_an_empty_value_is_an_empty_example_and_no_tombstone(broker, tmp_path):  # noqa: F811
    """b"" is a valid serialization (an empty tf.Example): it is read, its features take their defaults."""
    broker.create_topic("empty", 1)
    broker.produce("empty", {0: [example(0), b"", example(2)]})
    config = kafka_config(broker.bootstrap, "empty", tmp_path, "train_data.global_batch_size=3")
    with dataset(config) as data:
        (batch,) = list(data)
        counts = data.counts()
    assert len(batch) == 3
    assert batch.features["meta__tweet_id"].reshape(-1).tolist()[0::2] == [0, 2]
    assert counts["kafka_tombstones_skipped"] == 0
    assert counts["defaults_filled"] > 0


def test_a_training_run_of_tombstones_alone_is_passed_over(broker, tmp_path):  # noqa: F811
    """As training reads (drop_last, following): a run made only of tombstones is no batch and no error,
    ready() does not report it as a batch, and the position goes past it."""
    broker.create_topic("only-deletes", 1)
    produce_messages(broker.bootstrap, "only-deletes", 0, [None] * 4)
    config = kafka_config(broker.bootstrap, "only-deletes", tmp_path, "train_data.global_batch_size=4")
    with dataset(config, follow=True, drop_last=True, repeat=True, shuffle=True) as data:
        batches = iter(data)
        deadline = time.monotonic() + 60  # a bound against a hang, not a timing assertion
        while data.position() != {0: 4}:
            assert not data.ready(0.2), "a run of tombstones reported as a batch"
            assert time.monotonic() < deadline, "the tombstones were not passed over"
        produce_messages(broker.bootstrap, "only-deletes", 0, [4, None, 6, 7])
        assert ids([next(batches)]) == [4, 6, 7]
        assert data.position() == {0: 8}
        assert data.counts()["kafka_tombstones_skipped"] == 5


def outcome_of_reading(config, position: dict) -> object:
    """What reading the topic on from `position` ends with: the ids read, or the error; "hung" if it has not
    ended after 60 s (a bound against a hang, not a timing assertion)."""
    outcome: list = []

    def read() -> None:
        with dataset(config) as data:
            data.resume(position)
            try:
                outcome.append(ids(data))
            except (DataError, UserError) as error:
                outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    return outcome[0] if outcome else "hung"


def test_a_checkpoint_offset_past_the_partitions_end_is_one_error(broker, tmp_path):  # noqa: F811
    """The partition holds fewer messages than the checkpoint's run had read (deleted and recreated, or
    truncated): reading on from there would skip the new messages up to it, reading from the start might
    train records twice. Neither, silently: one line, with the way out."""
    broker.create_topic("recreated", 2)
    produce_ids(broker, "recreated", {0: range(0, 5), 1: range(100, 105)})
    config = kafka_config(broker.bootstrap, "recreated", tmp_path, "train_data.global_batch_size=2")
    error = outcome_of_reading(config, {0: 20, 1: 5})
    assert isinstance(error, DataError), error
    assert str(error) == (
        "train_data.kafka: topic recreated partition 0 ends at offset 5, before the checkpoint's next offset "
        "20: it was recreated or truncated since, and neither reading on from 20 (skipping its messages up "
        "to there) nor from its start (which may train records twice) is right; to read the topic afresh, "
        "train into a new training.save_dir (training.initial_checkpoint_dir: the old one, for its weights)"
    )
    assert outcome_of_reading(config, {0: 5, 1: 3}) == [103, 104]  # at or before the end: read on


def test_a_partition_without_a_checkpoint_offset_is_read_from_its_start(broker, tmp_path, caplog):  # noqa: F811
    """The checkpoint holds offsets of the topic but none of partition 1 (added since, or nothing of it was
    read): it is read from its earliest offset, whatever `start` says (latest would skip what arrived in
    it before the restart), with a warning naming it."""
    broker.create_topic("grown", 2)
    produce_ids(broker, "grown", {0: range(0, 4), 1: range(100, 104)})
    config = kafka_config(
        broker.bootstrap, "grown", tmp_path, "train_data.global_batch_size=4", start="latest"
    )
    with caplog.at_level("WARNING"):
        assert outcome_of_reading(config, {0: 2}) == [2, 3, 100, 101, 102, 103]
    assert (
        "train_data.kafka: topic grown partition(s) [1] have no offset in the checkpoint (added since, or "
        "nothing of them was read): read from their earliest offset, not from start: latest"
    ) in caplog.messages


def test_a_start_time_in_the_future_is_refused(broker, tmp_path):  # noqa: F811
    """No message is at or after it yet: starting at the end now would train on messages older than it."""
    broker.create_topic("future", 1)
    when = "2999-01-01T00:00:00+00:00"
    config = kafka_config(broker.bootstrap, "future", tmp_path, "train_data.global_batch_size=2", start=when)
    error = outcome_of_reading(config, {})
    assert isinstance(error, UserError), error
    assert str(error).startswith(f"train_data.kafka.start: {when} is in the future (now ")


def test_a_malformed_start_is_one_config_problem():
    from heavyranker.config import ConfigError, load_config

    from ..conftest import CONFIGS

    topic = "{bootstrap_servers: 'localhost:9092', topic: t, start: '2026-13-45'}"
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "local_small.yaml", ["train_data.inputs=null", f"train_data.kafka={topic}"])
    assert error.value.problems == [
        (
            "train_data.kafka.start",
            "start is earliest, latest or an ISO timestamp such as 2026-01-31T05:00 (got '2026-13-45')",
        )
    ]


def test_the_start_line_says_earliest_for_the_clients_minus_two():
    # Was "from offsets {0: -2, 1: 17}": -2 is confluent_kafka's OFFSET_BEGINNING, not an offset.
    from confluent_kafka import OFFSET_BEGINNING

    from heavyranker.data.sources.kafka import describe_starts

    assert OFFSET_BEGINNING == -2
    assert describe_starts({0: -2, 1: 17}) == "partition 0 at earliest, partition 1 at offset 17"
