"""tf.Examples for the Kafka tests: each carries its own id as meta.tweet_id (the rest of local_small's
features are drawn from it), and local_small's config reading a topic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from heavyranker.data.tf_example.encode import encode_example
from heavyranker.schema import load_schema

from .conftest import CONFIGS

SPECS = load_schema(str(CONFIGS / "segdense_small.json"))


def example(tweet_id: int) -> bytes:
    """A record of every schema feature, drawn from tweet_id: 0/1 integers (labels, flags, ids) and floats
    in [-1, 1)."""
    rng = np.random.default_rng(tweet_id)
    features = {
        name: rng.integers(0, 2, spec.length)
        if spec.dtype == "int64_list"
        else rng.uniform(-1, 1, spec.length)
        for name, spec in SPECS.items()
    }
    features["meta.tweet_id"] = np.array([tweet_id], np.int64)
    return encode_example(features)


def kafka_overrides(bootstrap: str, topic: str, **fields: object) -> list[str]:
    """--set overrides that make local_small's train_data read `topic` (fields: more of its kafka fields)."""
    spec = {"bootstrap_servers": bootstrap, "topic": topic, **fields}
    inline = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in spec.items())
    return ["train_data.inputs=null", f"train_data.kafka={{{inline}}}"]


def kafka_config(bootstrap: str, topic: str, save_dir: Path, *overrides: str, **fields: object):
    from heavyranker.config import load_config

    return load_config(
        CONFIGS / "local_small.yaml",
        [
            *kafka_overrides(bootstrap, topic, **fields),
            f"training.save_dir={save_dir}",
            "validation_data={}",
            *overrides,
        ],
    )


def produce_messages(bootstrap: str, topic: str, partition: int, ids: list[int | None]) -> None:
    """One message per entry, in order: example(i) for an id, a tombstone (a key, no value: a compacted
    topic's delete) for None."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in ids:
        if i is None:
            producer.produce(topic, value=None, key=b"deleted", partition=partition)
        else:
            producer.produce(topic, value=example(i), key=str(i).encode(), partition=partition)
    if producer.flush(30):
        raise RuntimeError("messages left unsent after 30 s")
