"""`training:` — the run: where it writes, how long, how often it logs, checkpoints and evaluates."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt

from .base import ConfigPath, StrictModel


class TrainingConfig(StrictModel):
    save_dir: ConfigPath = "/tmp/model"
    num_train_steps: PositiveInt = 1_000_000
    initial_checkpoint_dir: ConfigPath | None = Field(None, description="Warm start from this run's weights.")
    checkpoint_every_n: PositiveInt = 1000
    checkpoint_max_to_keep: PositiveInt | None = Field(None, description="None keeps every checkpoint.")
    train_log_every_n: PositiveInt = 1000
    num_eval_steps: int = Field(16384, description="Batches per evaluation; < 0 means the whole split.")
    eval_log_every_n: PositiveInt = 5000
    eval_timeout_in_s: PositiveFloat = 60 * 60
    gradient_accumulation: PositiveInt | None = Field(None, description="Micro-batches per optimizer step.")
    seed: int = 0
