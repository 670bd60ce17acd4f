"""`serving:` — how the per-engagement probabilities become one ranking score, and how `serve` runs.

`serve` finds this section in the model folder it serves: `export` writes the whole config into the
folder's manifest.json. Each option of ServeOptions is also a flag of `serve` (`max_candidates` is
`--max-candidates`), and a flag given wins over the section: flag > `serving:` > the default here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, Strict, ValidationError

from ..errors import SettingError
from .base import Count, Float, NonNegative, StrictModel

# The published home-timeline weighting, for the task names of the seed config.
PUBLISHED_ENGAGEMENT_WEIGHTS: dict[str, float] = {
    "recap.engagement.is_favorited": 0.5,
    "recap.engagement.is_retweeted": 1.0,
    "recap.engagement.is_replied": 13.5,
    "recap.engagement.is_profile_clicked_and_profile_engaged": 12.0,
    "recap.engagement.is_video_playback_50": 0.005,
    "recap.engagement.is_replied_reply_engaged_by_author": 75.0,
    "recap.engagement.is_good_clicked_convo_desc_favorited_or_replied": 11.0,
    "recap.engagement.is_good_clicked_convo_desc_v2": 10.0,
    "recap.engagement.is_negative_feedback_v2": -74.0,
    "recap.engagement.is_report_tweet_clicked": -369.0,
}

SERVING = "serving"  # the section's name in the config, which settings' names begin with

# A model task the published table does not name counts with this weight unless the config says otherwise.
DEFAULT_ENGAGEMENT_WEIGHT = 1.0


class ServeOptions(StrictModel):
    """How `serve` runs. The defaults here are the only ones: the CLI's flags and the app take them."""

    host: str = Field("127.0.0.1", description="The address serve binds: loopback only by default.")
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = Field(
        8000, description="The TCP port serve listens on (0: any free port)."
    )
    model_name: str = Field(
        "heavyranker",
        description="The model's name on /v2 (the Open Inference Protocol's /v2/models/{name}/...).",
    )
    max_candidates: Count = Field(
        2048,
        description="Candidates in one request, at most; more are answered 413. The body limit is what this "
        "many candidates take as JSON. Triton's config.pbtxt (export) takes the default as max_batch_size.",
    )
    max_queue: NonNegative = Field(
        8,
        description="Requests admitted beside the one being scored (reading, parsing or waiting); more are "
        "answered 503 with Retry-After. Past a handful, a client waits longer in the queue than it would "
        "retrying on another replica (the cost per forward: bench/serve_latency.py).",
    )
    read_timeout: Annotated[Float, Field(gt=0)] = Field(
        10.0,
        description="Seconds for a request's head, then for its body, to arrive whole (not between two "
        "reads: a client sending a byte now and then does not hold its place); past it the connection "
        "closes, after a 408 for a body. The default carries local_prod's largest JSON body (2,048 "
        "candidates, about 50 MB at 4 decimals) at 40 Mbit/s.",
    )
    max_batch: Count = Field(
        2048,
        description="Concurrent requests share one forward of the model up to this many candidates; a larger "
        "request is scored alone. Throughput per candidate stops growing past some forward size, while every "
        "request of a batch waits for all of it (bench/serve_latency.py, bench/results/serve_latency.json).",
    )
    batch_wait_ms: Annotated[Float, Field(ge=0)] = Field(
        2.0,
        description="Milliseconds, at most, that a request finding the model idle waits for others to join "
        "its forward: a small part of the smallest forward, enough for requests a caller sends together.",
    )
    repository: str | None = Field(
        None,
        description="A model repository (export --repository: a folder, or an fsspec URL such as "
        "s3://bucket/prefix) to serve from instead of --model: the newest complete version of model_name, "
        "swapped for each newer one without a pause (docs/model-repository.md).",
    )
    poll_seconds: Annotated[Float, Field(gt=0, le=3600)] = Field(
        2.0,
        description="Seconds between two looks at the repository for a new version (with repository).",
    )
    pin_version: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Serve this version of the repository and no other (a rollback), whatever is newer.",
    )


class ServingConfig(ServeOptions):
    """How the per-engagement probabilities become one ranking score, sum_i weight_i * p_i."""

    engagement_weights: dict[str, Float] | None = Field(
        None,
        description="Task name -> weight of its probability in the score; default: the published weights.",
    )


def default_engagement_weights(task_names: list[str]) -> dict[str, float]:
    return {t: PUBLISHED_ENGAGEMENT_WEIGHTS.get(t, DEFAULT_ENGAGEMENT_WEIGHT) for t in task_names}


def serve_options(section: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> ServeOptions:
    """The options of `serve`: each of `overrides` (the CLI's flags), else the `serving:` section of the
    config in `source` (a model folder's manifest.json), else the default. A bad value is a SettingError that
    names the setting (serving.max_queue), and `source` when the value came from there."""
    given = {name: section[name] for name in ServeOptions.model_fields if name in section}
    try:
        return ServeOptions.model_validate({**given, **overrides})
    except ValidationError as e:
        error = e.errors()[0]
        name = str(error["loc"][0])
        if error["type"] == "extra_forbidden":
            problem = "is not an option of serve"
        else:  # pydantic's "Input should be ...", with what was given
            problem = f"{error['msg'].removeprefix('Input ')} (got {error['input']!r:.80})"
        raise SettingError(f"{SERVING}.{name}", problem, None if name in overrides else source) from None
