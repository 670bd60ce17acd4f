"""`heavyranker data generate`: where each split's files go, and writing them (rows, labels, downsampling,
truth sidecars)."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from ...config import Config
from ...config.data import DataConfig
from ...errors import UserError
from ...memory import out_of_memory_as_user_error
from ..sources.files import folder_name
from ..sources.tfrecord import write_records
from ..tf_example import encode_tf_examples
from .holdout import WORLDS
from .layout import Layout, layout_for
from .truth import truth_path, write_truth
from .world import World

log = logging.getLogger(__name__)

DEFAULT_FILES = 8
DEFAULT_VALUES = 150_000_000  # default train size in feature values: 20k rows of the seed schema
MAX_DEFAULT_EXAMPLES = 600_000  # ... and 600k of a small one: local_small's 3000 steps see a row ~1.3 times
ROWS_PER_USER = 8  # in the train split, by default; authors are a quarter as many as users, tweets as rows
VALIDATION_FRACTION = 0.1


@dataclass
class SplitPlan:
    name: str
    data: DataConfig
    where: str  # the config field naming the root
    root: str  # the folder of the inputs glob, or the data_root of dated inputs
    subfolders: list[str]  # "" for a glob, YYYY/MM/DD[/HH] for dated inputs
    pattern: str = "*.gz"  # what the split reads in each folder (a glob)
    file_name: str = "part-{i:05d}.gz"  # what is written there: a format with {i} the pattern matches

    @property
    def folders(self) -> list[str]:
        return [os.path.normpath(os.path.join(self.root, sub)) for sub in self.subfolders]


def generate_for_config(
    config: Config,
    *,
    out: str | None = None,
    examples: int | None = None,
    files: int | None = None,
    seed: int = 0,
    world: str = "demo",
    id_effects: float = 0.0,
    rows_per_user: float = ROWS_PER_USER,
    rows_per_author: float | None = None,
) -> list[str]:
    """Writes data with a planted truth for the train split and each validation split, where their inputs
    point (or under out/<split name>), and returns the data files written.

    `examples` rows go to the train split (default: sized to the schema, at most 600,000) and a tenth of
    that to each validation split, in `files` files per split (default 8; at least one per dated
    folder). Every split draws its own rows (its seed comes from `seed` and its name) from the same
    users, authors and truth. A split whose tasks have downsampling rates below 1 keeps each drawn row
    with probability prod_t rate_t(label_t), so that its weights undo the sampling; it holds fewer rows
    than drawn. Splits reading the same folder share its files, written once for the first of them.
    `world`: whose planted truth, a name of WORLDS (holdout.py: the second benchmark's).
    `id_effects` > 0: users and authors get raw int64 ids, Zipf frequencies and a hidden per-id effect of
    that scale (World._plant_id_effects), which id embedding tables can learn; 0 leaves the data as it was.
    `rows_per_user`, `rows_per_author`: train rows per user and per author on average, which set how many
    users and authors there are (default 8, and authors a quarter as many as users)."""
    layout = layout_for(config.train_data, config.validation_data)
    n_train = default_examples(layout) if examples is None else examples
    if n_train < 1 or (files is not None and files < 1):
        raise UserError(f"examples and files must be positive (got {examples} and {files})")
    if files is not None and files > n_train:  # 10**8 files of no rows: a folder no file system lists
        raise UserError(f"files per split ({files:,}) must not exceed the train split's rows ({n_train:,})")
    if world not in WORLDS:
        raise UserError(f"no world {world!r} (there are: {', '.join(WORLDS)})")
    if id_effects < 0:
        raise UserError(f"id_effects must be 0 (off) or positive, got {id_effects}")
    if rows_per_user <= 0 or (rows_per_author is not None and rows_per_author <= 0):
        raise UserError(
            f"rows per user and per author must be positive (got {rows_per_user}, {rows_per_author})"
        )
    # The world holds a vector per user and author, and each split its rows: too many rows is an allocation
    # that fails at once (numpy's MemoryError), said here in one line.
    with out_of_memory_as_user_error("--examples", f"generating {n_train:,} rows"):
        users = max(64, int(n_train // rows_per_user))
        authors = None if rows_per_author is None else max(16, int(n_train // rows_per_author))
        planted = World(
            layout, users=users, authors=authors, seed=seed, truth=WORLDS[world], id_effects=id_effects
        )
        written: list[str] = []
        writer: dict[str, str] = {}  # folder -> the split written there
        for plan in _plans(config, out):
            fresh = [
                sub for sub, folder in zip(plan.subfolders, plan.folders, strict=True) if folder not in writer
            ]
            if len(fresh) < len(plan.subfolders):
                shared = next(f for f in plan.folders if f in writer)
                log.info("split %s reads %s, written for split %s", plan.name, shared, writer[shared])
                plan.subfolders = fresh
            if plan.subfolders:
                n = n_train if plan.name == "train" else max(1, round(n_train * VALIDATION_FRACTION))
                written += _write_split(planted, plan, n, files or DEFAULT_FILES, seed)
                writer.update(dict.fromkeys(plan.folders, plan.name))
    return written


def default_examples(layout: Layout) -> int:
    values = sum(spec.length for spec in layout.specs.values())
    return int(np.clip(DEFAULT_VALUES // values, 1000, MAX_DEFAULT_EXAMPLES))


def _plans(config: Config, out: str | None) -> list[SplitPlan]:
    """The splits in config order. Under `out`, each root the config names becomes out/<the name of the
    first split that reads it>, so that splits sharing their inputs still share them."""
    splits = {"train": config.train_data, **config.validation_data}
    plans = [_plan(name, data) for name, data in splits.items()]
    roots: dict[str, str] = {}
    for plan in plans:
        if out is not None:
            plan.root, plan.pattern = roots.setdefault(plan.root, os.path.join(out, plan.name)), "*.gz"
        elif glob.has_magic(plan.root):
            raise UserError(
                f"{plan.where}: the folder {plan.root!r} has a wildcard, so there is no one place to "
                f"write: give --out DIR and point the inputs there"
            )
        else:
            plan.file_name = _file_name(plan.pattern, plan.where)
    return plans


def _plan(name: str, data: DataConfig) -> SplitPlan:
    """Where a split's files go: the folder of its glob, or its dated folders (files.py's layout)."""
    where = "train_data" if name == "train" else f"validation_data.{name}"
    if data.inputs is not None:
        folder, pattern = os.path.split(data.inputs)
        where += ".inputs"
        return SplitPlan(name, data, where, folder, [""], pattern)
    if data.explicit_date_inputs is not None:
        dated, where = data.explicit_date_inputs, f"{where}.explicit_date_inputs.data_root"
        end = _now(hours=False) if dated.latest else dated.end
        stamps = [folder_name(end - timedelta(days=i), hours=False) for i in range(dated.days)]
    else:
        dated, where = data.explicit_datetime_inputs, f"{where}.explicit_datetime_inputs.data_root"
        end = _now(hours=True) if dated.latest else dated.end.replace(minute=0)
        stamps = [folder_name(end - timedelta(hours=i), hours=True) for i in range(dated.hours)]
    return SplitPlan(name, data, where, dated.data_root, sorted(stamps))


def _now(hours: bool) -> datetime:
    """Where `latest` dated folders end when they are written: this hour (day), in UTC."""
    now = datetime.now(UTC).replace(tzinfo=None, minute=0, second=0, microsecond=0)
    return now if hours else now.replace(hour=0)


def _file_name(pattern: str, where: str) -> str:
    """A file name format that the glob `pattern` matches (each * becomes part-00000, ...) and the truth
    sidecars do not."""
    name = pattern.replace("{", "{{").replace("}", "}}").replace("*", "part-{i:05d}").replace("?", "0")
    example = name.format(i=0)
    if not fnmatch.fnmatchcase(example, pattern) or fnmatch.fnmatchcase(truth_path(example), pattern):
        raise UserError(
            f"{where}: cannot name data files that {pattern!r} matches (and truth sidecars "
            f"*.truth.npz do not): use a glob such as *.gz, or give --out DIR"
        )
    return name


def _write_split(world: World, plan: SplitPlan, n: int, files: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, zlib.crc32(plan.name.encode()), *world.truth.salt])
    tweets = world.tweets(rng, max(1, n // 4))
    users, tweet_rows = world.impressions(rng, tweets, n)
    per_folder = max(1, -(-min(files, n) // len(plan.folders)))
    paths = [os.path.join(f, plan.file_name.format(i=i)) for f in plan.folders for i in range(per_folder)]
    for folder in plan.folders:
        _clear(folder, plan.pattern)
    rates = _downsampling(plan)
    written = []
    for path, rows, file_rng in zip(
        paths, np.array_split(np.arange(n), len(paths)), rng.spawn(len(paths)), strict=True
    ):
        features, signals, ids = world.rows(file_rng, tweets, users[rows], tweet_rows[rows])
        probabilities, labels = world.label(file_rng, signals)
        if rates:
            keep = _keep(file_rng, labels, world.layout.tasks, rates)
            features, ids = _take(features, keep), _take(ids, keep)
            probabilities, labels = probabilities[keep], labels[keep]
        if len(labels) == 0:  # a reader fails on a file without records
            continue
        features.update(world.label_features(labels))
        write_records(path, encode_tf_examples(features))
        write_truth(truth_path(path), world.layout.tasks, probabilities, labels, ids)
        written.append((path, len(labels)))
    if not written:
        raise UserError(
            f"split {plan.name}: no row of the {n} drawn survived downsampling at {rates}; "
            f"generate more examples"
        )
    kept = sum(count for _, count in written)
    log.info(
        "split %s: %d rows in %d files in %s%s",
        plan.name,
        kept,
        len(written),
        os.path.commonpath(plan.folders),
        f" (kept {kept} of {n} drawn, downsampled)" if rates else "",
    )
    return [path for path, _ in written]


def _take(arrays: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in arrays.items()}


def _clear(folder: str, pattern: str) -> None:
    """Removes earlier generated files the split would read, and refuses to touch any file it did not
    write: a split must not read a mix of old and new data."""
    os.makedirs(folder, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
        if not os.path.exists(truth_path(path)):
            raise UserError(
                f"{path} was not written by `heavyranker data generate` (it has no "
                f"{os.path.basename(truth_path(path))}): move it away, or write with --out DIR"
            )
        os.remove(path)
        os.remove(truth_path(path))


def _downsampling(plan: SplitPlan) -> dict[str, tuple[float, float]]:
    """Task -> (positive rate, negative rate), for the split's tasks with a rate below 1."""
    rates = {
        task: (t.pos_downsampling_rate, t.neg_downsampling_rate)
        for task, t in plan.data.tasks.items()
        if min(t.pos_downsampling_rate, t.neg_downsampling_rate) < 1
    }
    if len(rates) > 1:
        log.warning(
            "split %s downsamples %d tasks (%s): a row is kept with the product of their rates, so "
            "a task's weights undo its own rates but not the others' (exact with one task, as in "
            "local_prod.yaml's per-task splits)",
            plan.name,
            len(rates),
            ", ".join(rates),
        )
    return rates


def _keep(
    rng: np.random.Generator,
    labels: np.ndarray,
    tasks: tuple[str, ...],
    rates: dict[str, tuple[float, float]],
) -> np.ndarray:
    chance = np.ones(len(labels))
    for task, (pos, neg) in rates.items():
        chance *= np.where(labels[:, tasks.index(task)] == 1, pos, neg)
    return rng.random(len(labels)) < chance
