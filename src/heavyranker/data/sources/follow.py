"""Follow mode (training.follow, `train --follow`): which sources can be followed, and the position of a
followed source as a checkpoint keeps it."""

from __future__ import annotations

import logging
from typing import Any

from ...config import Config
from ...config.data import DataConfig
from ...errors import UserError
from .kafka import Offsets

log = logging.getLogger(__name__)


def follow_sources(config: Config) -> None:
    """Raise, before anything is read, when training.follow is set on a source that cannot be followed."""
    if config.training.follow and config.train_data.kafka is None:
        raise UserError(
            "training.follow (train --follow): train_data must be a kafka topic (train_data.kafka); "
            "following "
            "files (an inputs glob, dated folders) is not supported yet"
        )


def restore_position(state: dict[str, Any], data: DataConfig) -> Offsets:
    """The Kafka offsets a checkpoint's `state` holds for `data`'s topic; {} (start at kafka.start) when it
    holds none, or those of another topic."""
    saved = state.get("data_position")
    if data.kafka is None or saved is None:
        return {}
    if saved["topic"] != data.kafka.topic:
        log.warning(
            "the checkpoint holds the offsets of kafka topic %s, not of %s: reading %s from kafka.start (%s)",
            saved["topic"],
            data.kafka.topic,
            data.kafka.topic,
            data.kafka.start,
        )
        return {}
    return {int(partition): int(offset) for partition, offset in saved["offsets"].items()}
