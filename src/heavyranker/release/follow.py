"""A training run that promotes as it goes (`training.promote`): the Trainer calls a Promoter with each
checkpoint it writes (train/loop.py's on_checkpoint hook, on rank 0); when one is due (every_steps, or
every_minutes since the last promotion), it is the candidate of promote(), in the training process: the
steps wait while the candidate and the repository's version are scored and, if published, exported. A
promotion that fails (the repository unreachable, a damaged version) is logged and training goes on; the
next one tries again."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..config.promotion import PromoteConfig
from ..errors import UserError
from ..serve.repository import open_repository
from .promote import promote
from .rule import PromotionRule

log = logging.getLogger(__name__)


class Promoter:
    """Called with (checkpoint, step) after each checkpoint; promotes the due ones."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic):
        settings = config.training.promote
        if settings is None:
            raise UserError("training.promote: not set, so there is nothing to promote to")
        self.config, self.settings, self.clock = config, settings, clock
        self.repository = open_repository(settings.repository, settings.model_name)
        self.rule = promotion_rule(settings)
        self.last_promotion = clock()  # the run's start counts as one, for every_minutes

    def due(self, step: int) -> bool:
        every_steps, every_minutes = self.settings.every_steps, self.settings.every_minutes
        if every_steps is not None and step % every_steps == 0:
            return True
        return every_minutes is not None and self.clock() - self.last_promotion >= 60 * every_minutes

    def __call__(self, checkpoint: Path, step: int) -> None:
        if not self.due(step):
            return
        self.last_promotion = self.clock()
        try:  # the decision goes to the repository's promotions.jsonl: a run of weeks keeps none in memory
            promote(
                self.config,
                self.repository,
                checkpoint=str(checkpoint),
                split=self.settings.split,
                rule=self.rule,
                format=self.settings.format,
                precision=self.settings.precision,
                table_precision=self.settings.table_precision,
                keep=self.settings.keep_versions,
            )
        except Exception as e:  # whatever the repository or the scoring raises: training goes on
            log.error("training.promote: promoting the checkpoint of step %d failed: %s", step, e)
        # What it exported and scored (the candidate's program, the repository version's) is cyclic garbage:
        # a torch program's graph and modules point at each other. Python's own collections came late in a
        # training process, so a model's size each (~250 MB for local_prod) stayed until then.
        gc.collect()


def promotion_rule(settings: PromoteConfig) -> PromotionRule:
    return PromotionRule(
        metric=settings.metric,
        tasks=tuple(settings.tasks),
        tolerance=settings.tolerance,
        resamples=settings.resamples,
        weighted=settings.weighted,
    )
