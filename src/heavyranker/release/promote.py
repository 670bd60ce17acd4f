"""`heavyranker promote`: a candidate checkpoint reaches the model repository only if it is not worse than
the version there.

Both are scored on one held-out validation split (`--split`, default the config's first; neither was trained
on it: the config's validation splits are kept out of training) - the candidate as the program it would be
published as (exported first), the repository's newest version as the program it serves - and `compare`'s
paired bootstrap gives, per task, the candidate's difference with its 95% interval. The rule (rule.py's
PromotionRule): refused if any task's metric (RCE by default) is worse beyond the interval by more than the
tolerance, that is if the interval's upper end of candidate - current lies below -tolerance; or, weighted,
if the engagement-weighted sum of the tasks' differences is. Else the program judged is published as the
next version. Every decision, published or refused, is one line of REPO/<model-name>/promotions.jsonl, with
its figures, and a line of the log. An empty repository takes the candidate without a comparison.

`promote(...)` is the function follow-mode training calls every N steps.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..config import Config
from ..eval.compare import run_checkpoint, scorable_program, score, validation_split
from ..eval.evaluator import evaluation_tasks
from ..serve.export import export_model
from ..serve.precision import check_precision
from ..serve.repository import DEFAULT_KEEP, ModelRepository
from ..serve.served_program import served_program
from ..serve.table_precision import check_table_precision
from .leftovers import torch_leftovers_released
from .rule import DEFAULT_RULE, PromotionRule, judge

log = logging.getLogger(__name__)


@dataclass
class Decision:
    published: bool
    reason: str
    split: str
    candidate: dict[str, Any]
    current: dict[str, Any] | None
    rule: dict[str, Any]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> a, b, low, high, worse
    weighted: dict[str, Any] | None = None  # the weighted rule's figures (rule.py)
    version: int | None = None  # the version published
    time: float = field(default_factory=time.time)


def promote(
    config: Config,
    repository: ModelRepository,
    *,
    checkpoint: str | None = None,
    split: str | None = None,
    rule: PromotionRule = DEFAULT_RULE,
    format: str = "onnx",
    precision: str = "fp32",
    table_precision: str = "fp32",
    keep: int | None = DEFAULT_KEEP,
) -> Decision:
    """Scores `checkpoint` (default: training.save_dir's best marked, else newest) against the repository's
    newest version on `split`, publishes it if `rule` allows, and records the decision. The candidate is
    exported first (`format`, `precision`, `table_precision`) and judged as that program, which is the one
    published."""
    check_precision(precision, format)
    check_table_precision(table_precision)
    split, data = validation_split(
        config, split, "promote: the config has no validation_data to hold out for the comparison"
    )
    tasks = evaluation_tasks(config, data)
    rule.check(tasks)
    path = run_checkpoint(checkpoint or str(config.training.save_dir), None)
    with (
        torch_leftovers_released(),  # a follow run promotes in its training process for weeks
        tempfile.TemporaryDirectory(prefix="heavyranker_promote_") as staging,
    ):
        # Judged as the program it would be published as, as the current version is: the checkpoint's eager
        # model differs from any program by float rounding, which the paired interval can read as worse on a
        # task with a positive or two; in bf16 or int8 the program's rounding costs quality the rule must see.
        staged = export_model(
            config, checkpoint=str(path), out=staging, format=format, precision=precision,
            table_precision=table_precision,
        )  # fmt: skip
        model, _, step = scorable_program(served_program(Path(staged)), str(path), data, tasks)
        candidate: dict[str, Any] = {"checkpoint": str(path), "step": step}
        if (precision, table_precision) != ("fp32", "fp32"):
            candidate.update(precision=precision, table_precision=table_precision)
        copy_staged = partial(shutil.copytree, staged, dirs_exist_ok=True)  # what was judged is published
        publish = partial(repository.publish, copy_staged, keep=keep)
        decision = Decision(False, "", split, candidate, None, asdict(rule))
        current = repository.newest()
        if current is None:
            decision.published, decision.reason = True, "the repository has no version yet"
        else:
            served, folder, served_step = served_program(repository.local_folder(current))
            decision.current = {"version": current, "step": served.scorer.manifest["checkpoint"]["step"]}
            program = (format, precision, table_precision)
            if _serves_already(served.scorer.manifest, repository.published(current), path, program):
                decision.reason = (
                    f"version {current} is this checkpoint already, exported as {format} {precision}"
                )
            else:
                a, b = score(config, [(served, folder, served_step), (model, path, step)], data)
                verdict = judge(rule, tasks, a, b, config.engagement_weights, current)
                decision.published, decision.reason = verdict.published, verdict.reason
                decision.tasks, decision.weighted = verdict.tasks, verdict.weighted
        if decision.published:
            decision.version = publish()
    repository.append_decision(asdict(decision))
    log.info(
        "promote %s (step %s): %s: %s",
        path,
        step,
        f"published as version {decision.version}" if decision.published else "refused",
        decision.reason,
    )
    return decision


def _serves_already(
    manifest: dict[str, Any], published: float | None, checkpoint: Path, program: tuple[str, str, str]
) -> bool:
    """Whether the version of `manifest` is the program the candidate would be: exported from this checkpoint
    file as it is now (not rewritten since the version was published) in the same format and precisions.
    Scored, the two differ by the program's float rounding alone, which the rule read as worse beyond the
    interval on a task with a positive or two: the served model was refused as worse than itself."""
    exported_from = manifest["checkpoint"].get("path")
    exported_as = (
        manifest.get("program_format"),
        manifest.get("precision", "fp32"),
        manifest.get("table_precision", "fp32"),
    )
    same_program = exported_as == program
    return (
        same_program
        and exported_from is not None
        and published is not None
        and Path(exported_from).resolve() == checkpoint.resolve()
        and os.stat(checkpoint).st_mtime <= published
    )
