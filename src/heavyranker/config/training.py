"""`training:` — the run: where it writes, how long, how often it logs, checkpoints and evaluates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from .base import ConfigPath, Count, Float, StrictModel
from .promotion import PromoteConfig


class KeepBestConfig(StrictModel):
    """Which evaluation chooses the best checkpoint: higher is better for both metrics."""

    split: str = Field(description="A validation split.")
    task: str = Field("mean", description="A model task, or `mean`: the mean over the split's tasks.")
    metric: Literal["auroc", "rce"] = Field("rce", description="The metric compared.")
    patience: Count | None = Field(None, description="Stop after this many evaluations without a new best.")


class TrainingConfig(StrictModel):
    """The run: where it writes, how long, how often it logs, checkpoints and evaluates."""

    save_dir: ConfigPath = Field(
        "/tmp/model", description="The run folder: checkpoints, metrics.jsonl, evaluations, TensorBoard."
    )
    num_train_steps: Count = Field(1_000_000, description="Optimizer steps of the whole run.")
    initial_checkpoint_dir: ConfigPath | None = Field(None, description="Warm start from this run's weights.")
    checkpoint_every_n: Count = Field(1000, description="Steps between checkpoints (and one at the end).")
    checkpoint_max_to_keep: Count | None = Field(None, description="None keeps every checkpoint.")
    train_log_every_n: Count = Field(1000, description="Steps between training log lines.")
    num_eval_steps: StrictInt = Field(16384, description="Batches per evaluation; < 0 means the whole split.")
    eval_log_every_n: Count = Field(5000, description="Steps between evaluations during training.")
    eval_timeout_in_s: Float = Field(
        60 * 60, gt=0.0, description="`evaluate --watch` stops after this long without a new checkpoint."
    )
    gradient_accumulation: Count | None = Field(None, description="Micro-batches per optimizer step.")
    keep_best: KeepBestConfig | None = Field(None, description="Keep and mark the best checkpoint.")
    seed: StrictInt = Field(0, ge=0, le=2**64 - 1, description="Below 2**64: torch and numpy both take it.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="fp32, or bf16: mixed precision, the dense layers' products in bfloat16 and the weights, "
        "optimizer state, losses, BatchNorm statistics and metrics in fp32 (`train --amp` sets it). "
        "Checkpoints are fp32 either way. See docs/precision.md.",
    )
    embedding_sharding: Literal["replicated", "torchrec"] = Field(
        "replicated",
        description="Where model.large_embeddings live under DDP: `replicated` (a full copy on every rank) "
        "or `torchrec` (split over the ranks by torchrec's planner; needs the torchrec extra, see "
        "docs/sharding.md).",
    )
    follow: bool = Field(
        False,
        description="Train on train_data (kafka, new files of an inputs glob, new dated folders) as it "
        "arrives, each record once, until SIGTERM; "
        "num_train_steps then only ends the schedules (`train --follow` sets it).",
    )
    promote: PromoteConfig | None = Field(
        None,
        description="Promote checkpoints into a model repository while training (the promotion pauses "
        "the steps): docs/model-repository.md.",
    )

    @field_validator("num_eval_steps")
    @classmethod
    def _some_batches(cls, value: int) -> int:
        if value == 0:
            raise PydanticCustomError(
                "no_batches", "0 batches would evaluate nothing: give a number of batches, or -1 for all", {}
            )
        return value
