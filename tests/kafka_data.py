"""tf.Examples for the Kafka tests: each carries its own id as meta.tweet_id (the rest of local_small's
features take their schema defaults), and local_small's config reading a topic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from heavyranker.data.tf_example.encode import encode_example

from .conftest import CONFIGS


def example(tweet_id: int) -> bytes:
    return encode_example(
        {
            "meta.tweet_id": np.array([tweet_id], np.int64),
            "recap.engagement.is_favorited": np.array([tweet_id % 2]),
        }
    )


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
