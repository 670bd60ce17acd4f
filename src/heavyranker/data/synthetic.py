"""Synthetic Recap data with a planted ground truth: `heavyranker data generate`.

The story. A world of users and authors with hidden traits (activity, grumpiness, popularity, toxicity, a
taste vector); each split shows tweets of those authors to those users. A row holds observed evidence of
the traits: heavy-tailed counts with many exact zeros (engagements, followers, reports, favorites), sparse
flags (has video, follows the author), categorical values, TwHIN-like embeddings that are linear images of
the tastes. Users, authors and tweets recur across rows with the same ids and entity-level features.

The truth. Every label is drawn from a logistic model of OBSERVED features only (as written, float32), so
the planted probability is the best any model of the features can do; it is written next to each data
file (truth.py). The logit mixes a shared engagement score (correlated tasks) with terms a linear model
cannot express: a product of two counts, a user x author embedding affinity (bilinear), a bump in tweet
age, a threshold on past user-author engagements, an XOR of two flags and a gate (only videos get
watched). A hidden per-impression mood, shared by the positive engagements, correlates the labels beyond
the features; the planted probability integrates it out. Each task's bias is solved for a realistic base
rate (a like is common, a report is rare).

Only the continuous and binary columns the config keeps (truncate_and_slice) and the user and author
embeddings carry signal; the other columns are realistic noise. Works for any schema: a narrow one keeps
the most important signals, features with no known role are filled by dtype.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, ndtri

from ..config import Config
from ..config.data import DATE_FORMAT, DataConfig, parse_end_datetime
from ..errors import UserError
from ..schema import FeatureSpec, load_schema
from .preprocess import mask_columns
from .tf_example import encode_tf_examples
from .tfrecord import write_records
from .truth import truth_path, write_truth

log = logging.getLogger(__name__)

DEFAULT_FILES = 8
DEFAULT_VALUES = 150_000_000  # default train size in feature values: 20k rows of the seed schema
MAX_DEFAULT_EXAMPLES = 600_000  # ... and 600k of a small one: local_small's 3000 steps see a row ~1.3 times
ROWS_PER_USER = 8  # in the train split; authors are a quarter as many as users, tweets as rows
VALIDATION_FRACTION = 0.1

EMBEDDINGS = ("user_embedding", "user_eng_embedding", "author_embedding")
META_IDS = {"meta__user_id": "user_id", "meta__tweet_id": "tweet_id", "meta__author_id": "author_id"}
WIDE = ("continuous", "binary", "discrete")
LEVELS = ("user", "author", "tweet", "example")  # where a column's value comes from
TASTE_DIMS = 8
MOOD_STD = 0.7  # the hidden per-impression mood, in logit units
PILOT_EXAMPLES = 20_000  # rows that fix the truth's standardization and biases
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite.hermgauss(8)  # 1e-7 relative error on a logistic


@dataclass(frozen=True)
class TaskProfile:
    """One task's logit: bias + engage * (shared engagement score) + sum of weight * term, where the
    terms are inputs of `World._inputs`; with a gate, 5 lower where the gate flag is off."""

    rate: float  # the base rate the bias is solved for
    engage: float
    terms: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    mood: float = 1.0  # loading on the hidden mood


# Keyed by the task name without "recap.engagement."; base rates of a home timeline's order.
PROFILES: dict[str, TaskProfile] = {
    "is_favorited": TaskProfile(0.07, 1.0, {"image": 0.4}),
    "is_tweet_detail_dwelled_15_sec": TaskProfile(0.06, 0.6, {"image": 0.4, "age_bump": 0.3}),
    "is_video_playback_50": TaskProfile(0.03, 0.8, {"age_bump": 0.4}, gate="video"),
    "is_good_clicked_convo_desc_v2": TaskProfile(0.02, 0.8, {"reply": 0.6}),
    "is_replied": TaskProfile(0.015, 0.8, {"follow_xor_reply": 0.9}),
    "is_retweeted": TaskProfile(0.01, 0.9, {"pop": 0.5, "pop_x_fav": 0.6}),
    "is_good_clicked_convo_desc_favorited_or_replied": TaskProfile(0.006, 1.0, {"reply": 0.6}),
    "is_bookmarked": TaskProfile(0.005, 0.8, {"fav": 0.4}),
    "is_profile_clicked_and_profile_engaged": TaskProfile(0.004, 0.7, {"unfollowed": 0.7, "aff": 0.5}),
    "is_shared": TaskProfile(0.003, 0.7, {"pop": 0.4}),
    "is_negative_feedback_v2": TaskProfile(0.003, -0.8, {"neg_unfollowed": 0.5, "neg": 0.2}, mood=-0.5),
    "is_replied_reply_engaged_by_author": TaskProfile(0.0015, 0.8, {"pop": -0.8, "follow_xor_reply": 0.8}),
    "is_report_tweet_clicked": TaskProfile(0.0008, -0.8, {"rep_x_neg": 0.4, "rep": 0.3}, mood=-0.5),
}
# The shared engagement score. Mostly non-linear: a logistic regression on the features sees little of it.
ENGAGE = {
    "act": 0.3,
    "fav": 0.2,
    "follow": 0.2,
    "act_x_fav": 0.6,
    "aff": 0.4,
    "age_bump": 0.8,
    "ua_3plus": 0.4,
}

# The observed columns behind the truth's inputs, most important first (a narrow schema plants the first).
SOURCES = {
    "continuous": (
        "user_engagements",
        "author_followers",
        "tweet_favs",
        "tweet_age_minutes",
        "user_author_engagements",
        "user_negative_feedback",
        "author_reports",
    ),
    "binary": ("follows_author", "has_video", "is_reply", "has_image"),
}
LOG_INPUTS = {
    "act": "user_engagements",
    "neg": "user_negative_feedback",
    "pop": "author_followers",
    "rep": "author_reports",
    "fav": "tweet_favs",
    "age": "tweet_age_minutes",
    "ua": "user_author_engagements",
}
FLAG_INPUTS = {"follow": "follows_author", "video": "has_video", "reply": "is_reply", "image": "has_image"}
STANDARDIZED = ("act", "neg", "pop", "rep", "fav", "age", "aff")


# ------------------------------------------------------------------------------------------- the command


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
) -> list[str]:
    """Writes data with a planted truth for the train split and each validation split, where their inputs
    point (or under out/<split name>), and returns the data files written.

    `examples` rows go to the train split (default: sized to the schema, at most 600,000) and a tenth of
    that to each validation split, in `files` files per split (default 8; at least one per dated
    folder). Every split draws its own rows (its seed comes from `seed` and its name) from the same
    users, authors and truth. A split whose tasks have downsampling rates below 1 keeps each drawn row
    with probability prod_t rate_t(label_t), so that its weights undo the sampling; it holds fewer rows
    than drawn. Splits reading the same folder share its files, written once for the first of them."""
    layout = layout_for(config)
    n_train = default_examples(layout) if examples is None else examples
    if n_train < 1 or (files is not None and files < 1):
        raise UserError(f"examples and files must be positive (got {examples} and {files})")
    world = World(layout, users=max(64, n_train // ROWS_PER_USER), seed=seed)
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
            written += _write_split(world, plan, n, files or DEFAULT_FILES, seed)
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
        end = datetime.strptime(dated.end_date, DATE_FORMAT)
        stamps = [(end - timedelta(days=i)).strftime("%Y/%m/%d") for i in range(dated.days)]
    else:
        dated, where = data.explicit_datetime_inputs, f"{where}.explicit_datetime_inputs.data_root"
        end = parse_end_datetime(dated.end_datetime).replace(minute=0)
        stamps = [(end - timedelta(hours=i)).strftime("%Y/%m/%d/%H") for i in range(dated.hours)]
    return SplitPlan(name, data, where, dated.data_root, sorted(stamps))


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
    rng = np.random.default_rng([seed, zlib.crc32(plan.name.encode())])
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


# -------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """What a row holds: the schema, the role of each schema feature, the labels, the kept columns."""

    specs: dict[str, FeatureSpec]
    roles: dict[str, str]  # schema name -> renamed name (continuous, meta__user_id, ...) or "label"
    tasks: tuple[str, ...]
    kept: dict[str, np.ndarray]  # continuous / binary -> the columns the model sees

    def spec(self, role: str) -> FeatureSpec | None:
        return next((self.specs[name] for name, r in self.roles.items() if r == role), None)


def layout_for(config: Config) -> Layout:
    """The train split's schema and renames; labels for the tasks of every split."""
    data = config.train_data
    for split, other in config.validation_data.items():
        if other.seg_dense_schema.schema_path != data.seg_dense_schema.schema_path:
            raise UserError(
                f"validation_data.{split}.seg_dense_schema.schema_path differs from train_data's: "
                f"the generator writes one schema for all splits"
            )
    specs = load_schema(data.seg_dense_schema.schema_path)
    tasks = list(dict.fromkeys([t for d in (data, *config.validation_data.values()) for t in d.tasks]))
    roles = {old: new for new, old in data.seg_dense_schema.renamed_features.items()}
    roles.update(dict.fromkeys(tasks, "label"))
    layout = Layout(specs, roles, tuple(tasks), {})
    for role in SOURCES:
        spec = layout.spec(role)
        layout.kept[role] = _kept_columns(data, role, spec.length if spec else 0)
    return layout


def _kept_columns(data: DataConfig, role: str, width: int) -> np.ndarray:
    """The columns truncate_and_slice keeps: the first `truncation`, then those of the mask."""
    columns = np.arange(width)
    ts = data.preprocess.truncate_and_slice if data.preprocess else None
    if ts:
        limit, mask = getattr(ts, f"{role}_feature_truncation"), getattr(ts, f"{role}_feature_mask_path")
        columns = columns[:limit]
        if mask is not None:
            columns = columns[mask_columns(mask, len(columns))]
    return columns


# --------------------------------------------------------------------------------------------- the world


@dataclass
class Entities:
    """Users, authors or a split's tweets: ids, hidden traits, values of their own level's columns."""

    ids: np.ndarray
    traits: dict[str, np.ndarray]
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # wide feature -> [n, its columns here]
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # as written, float32


class World:
    """Users, authors, how columns are drawn, and the planted truth: everything the splits share."""

    def __init__(self, layout: Layout, *, users: int, seed: int):
        self.layout = layout
        rng = np.random.default_rng([seed, 1])
        self.recipes = {}
        for role, width in self._wide_widths().items():
            self.recipes[role] = _Recipe.draw(rng, role, width, layout.kept.get(role, np.arange(0)))
        # Planted columns: the first sources at random kept columns, the rest of the sources dropped.
        self.planted = {
            role: dict(zip(SOURCES[role], self.recipes[role].planted.tolist(), strict=False))
            for role in SOURCES
            if role in self.recipes
        }
        self.users = self._entities(
            rng,
            users,
            "user",
            act=rng.standard_normal(users),
            neg=rng.standard_normal(users),
            taste=_unit(rng, users),
        )
        authors = max(16, users // 4)
        self.authors = self._entities(
            rng,
            authors,
            "author",
            pop=rng.standard_normal(authors),
            tox=rng.standard_normal(authors),
            taste=_unit(rng, authors),
        )
        self.standardize: dict[str, tuple[float, float]] = {}
        self.bias = np.zeros(len(layout.tasks))
        self._fit_truth(np.random.default_rng([seed, 2]))

    def _wide_widths(self) -> dict[str, int]:
        """Widths of the wide features, and of the features nobody reads (filled by dtype, as one block)."""
        widths = {"other_float": 0, "other_int": 0}
        for name, spec in self.layout.specs.items():
            kind = _kind(self.layout.roles.get(name), spec)
            if kind in WIDE:
                widths[kind] = spec.length
            elif kind in widths:
                widths[kind] += spec.length
        return {role: width for role, width in widths.items() if width}

    def _entities(self, rng: np.random.Generator, n: int, level: str, **traits: np.ndarray) -> Entities:
        """Users or authors: ids, traits, their columns and their embeddings."""
        entities = Entities(_ids(rng, n), traits)
        entities.columns = self._level_columns(rng, level, traits["act" if level == "user" else "pop"])
        if level == "user":  # the engagement embedding also knows how active and how grumpy the user is
            latent = {
                "user_embedding": traits["taste"],
                "user_eng_embedding": np.column_stack([traits["taste"], traits["act"], traits["neg"]]),
            }
        else:
            latent = {"author_embedding": traits["taste"]}
        for name, values in latent.items():
            spec = self.layout.spec(name)
            if spec is not None:
                projection = _projection(rng, values.shape[1], spec.length)
                noise = 0.01 * rng.standard_normal((n, spec.length))
                entities.embeddings[name] = (values @ projection + noise).astype(np.float32)
                entities.traits[f"{name}_projection"] = projection
        return entities

    def _level_columns(
        self, rng: np.random.Generator, level: str, driver: np.ndarray
    ) -> dict[str, np.ndarray]:
        return {role: recipe.values(rng, level, driver) for role, recipe in self.recipes.items()}

    def tweets(self, rng: np.random.Generator, n: int) -> Entities:
        """A split's tweets: popular authors tweet (and are seen) more."""
        pop = self.authors.traits["pop"]
        author = rng.choice(len(pop), size=n, p=_normalized(np.exp(pop)))
        tweets = Entities(
            _ids(rng, n, low=1 << 60),
            {  # snowflake-like ids, above 2**53
                "author": author,
                "qual": rng.standard_normal(n),
                "video": rng.random(n) < 0.2,
                "image": rng.random(n) < 0.3,
                "reply": rng.random(n) < 0.25,
            },
        )
        tweets.columns = self._level_columns(rng, "tweet", tweets.traits["qual"])
        return tweets

    def impressions(
        self, rng: np.random.Generator, tweets: Entities, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """n distinct (user, tweet) pairs: active users, and good tweets of popular authors, are seen more."""
        user_p = _normalized(np.exp(0.6 * self.users.traits["act"]))
        tweet_p = _normalized(
            np.exp(0.5 * tweets.traits["qual"] + 0.5 * self.authors.traits["pop"][tweets.traits["author"]])
        )
        users = rng.choice(len(user_p), size=2 * n, p=user_p)
        tweet_rows = rng.choice(len(tweet_p), size=2 * n, p=tweet_p)
        _, first = np.unique(users * len(tweet_p) + tweet_rows, return_index=True)
        keep = np.sort(first)[:n]
        if len(keep) < n:
            raise UserError(
                f"cannot draw {n} distinct impressions of {len(tweet_p)} tweets for "
                f"{len(user_p)} users: generate more examples"
            )
        return users[keep], tweet_rows[keep]

    # -- rows ------------------------------------------------------------------------------------------

    def rows(
        self,
        rng: np.random.Generator,
        tweets: Entities,
        users: np.ndarray,
        tweet_rows: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The rows of these impressions: features as written (schema name -> [n, length], labels
        excepted), the truth's signals (`_signals`), and the ids (user_id, tweet_id, author_id -> [n])."""
        n = len(users)
        author = tweets.traits["author"][tweet_rows]
        signals = self._signals(rng, tweets, users, tweet_rows, author)
        at = {"user": users, "author": author, "tweet": tweet_rows}
        by_level = {"user": self.users.columns, "author": self.authors.columns, "tweet": tweets.columns}
        blocks = {}
        for role, recipe in self.recipes.items():
            blocks[role] = recipe.assemble(
                {level: by_level[level][role][at[level]] for level in at},
                recipe.values(rng, "example", np.zeros(n)),
            )
        for role, planted in self.planted.items():
            for source, column in planted.items():
                blocks[role][:, column] = signals[source]
        ids = {
            "user_id": self.users.ids[users],
            "author_id": self.authors.ids[author],
            "tweet_id": tweets.ids[tweet_rows],
        }
        embeddings = {
            **{k: v[users] for k, v in self.users.embeddings.items()},
            **{k: v[author] for k, v in self.authors.embeddings.items()},
        }
        return self._features(blocks, ids, embeddings, n), signals, ids

    def _signals(
        self,
        rng: np.random.Generator,
        tweets: Entities,
        users: np.ndarray,
        tweet_rows: np.ndarray,
        author: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """The planted sources (as written, in their column's dtype) and the user and author embeddings:
        all the truth reads."""
        n = len(users)
        u, a, t = self.users.traits, self.authors.traits, tweets.traits
        cosine = np.einsum("ij,ij->i", u["taste"][users], a["taste"][author])
        affinity = cosine * np.sqrt(TASTE_DIMS)  # ~N(0, 1)
        age = np.exp(4.5 + 1.2 * rng.standard_normal(n))  # minutes since the tweet was posted
        drawn = {
            "user_engagements": rng.poisson(np.exp(1.2 + u["act"][users])),
            "author_followers": np.floor(np.exp(6.5 + 1.8 * a["pop"][author])),
            "tweet_favs": rng.poisson(
                np.exp(0.5 + 0.9 * t["qual"][tweet_rows] + 0.7 * a["pop"][author]) * (age / 60) ** 0.7
            ),
            "tweet_age_minutes": age,
            "user_author_engagements": rng.poisson(np.exp(-1.0 + 1.5 * affinity)),
            "user_negative_feedback": rng.poisson(np.exp(-1.5 + 1.2 * u["neg"][users])),
            "author_reports": rng.poisson(np.exp(-2.5 + 1.5 * a["tox"][author])),
            "follows_author": rng.random(n) < expit(-1.5 + 2.0 * affinity + 0.3 * a["pop"][author]),
            "has_video": t["video"][tweet_rows],
            "is_reply": t["reply"][tweet_rows],
            "has_image": t["image"][tweet_rows],
        }
        signals = {}
        for role, planted in self.planted.items():
            dtype = _numpy_dtype(self.layout.spec(role))
            signals.update({source: drawn[source].astype(dtype) for source in planted})
        signals.update({k: v[users] for k, v in self.users.embeddings.items() if k == "user_embedding"})
        signals.update({k: v[author] for k, v in self.authors.embeddings.items()})
        return signals

    def _features(
        self,
        blocks: dict[str, np.ndarray],
        ids: dict[str, np.ndarray],
        embeddings: dict[str, np.ndarray],
        n: int,
    ) -> dict[str, np.ndarray]:
        out, offsets = {}, {"other_float": 0, "other_int": 0}
        for name, spec in self.layout.specs.items():
            kind = _kind(self.layout.roles.get(name), spec)
            if kind == "label":
                continue
            if kind in META_IDS:
                values = ids[META_IDS[kind]][:, None]
            elif kind in EMBEDDINGS:
                values = embeddings[kind]
            elif kind in WIDE:
                values = blocks[kind]
            elif kind == "other_bytes":
                values = np.full((n, spec.length), b"synthetic", dtype=object)
            else:
                values = blocks[kind][:, offsets[kind] : offsets[kind] + spec.length]
                offsets[kind] += spec.length
            out[name] = _as_written(values, spec)
        return out

    def label_features(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The label columns of the rows, as written."""
        return {
            task: _as_written(labels[:, [j]], self.layout.specs[task])
            for j, task in enumerate(self.layout.tasks)
        }

    # -- the truth -------------------------------------------------------------------------------------

    def label(
        self, rng: np.random.Generator, signals: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The planted probabilities [n, tasks] (float64) and labels drawn from them [n, tasks] (int64)."""
        logits, mood = self._logits(signals)
        eta = MOOD_STD * rng.standard_normal((len(logits), 1))
        labels = (rng.random(logits.shape) < expit(logits + mood * eta)).astype(np.int64)
        return _integrate_mood(logits, mood), labels

    def _inputs(self, signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The truth's inputs: log counts, flags, the embedding affinity, and their non-linear mixes."""
        n = len(next(iter(signals.values())))
        x = {
            name: np.log1p(signals[source].astype(np.float64)) if source in signals else np.zeros(n)
            for name, source in LOG_INPUTS.items()
        }
        x.update(
            {
                name: signals[source].astype(np.float64) if source in signals else np.zeros(n)
                for name, source in FLAG_INPUTS.items()
            }
        )
        x["aff"] = self._observed_affinity(signals, n)
        for name, (center, scale) in self.standardize.items():
            x[name] = (x[name] - center) / scale
        x["ua_3plus"] = (x.pop("ua") >= np.log1p(3)).astype(np.float64)
        x["act_x_fav"] = x["act"] * x["fav"]
        x["pop_x_fav"] = x["pop"] * x["fav"]
        x["rep_x_neg"] = x["rep"] * x["neg"]
        x["age_bump"] = 1.0 - x["age"] ** 2  # neither brand new nor stale
        x["follow_xor_reply"] = (2 * x["follow"] - 1) * (2 * x["reply"] - 1)
        x["unfollowed"] = 1.0 - x["follow"]
        x["neg_unfollowed"] = x["neg"] * x["unfollowed"]
        return x

    def _observed_affinity(self, signals: dict[str, np.ndarray], n: int) -> np.ndarray:
        """taste_user . taste_author, recovered from the written embeddings (orthonormal projections)."""
        if "user_embedding" not in signals or "author_embedding" not in signals:
            return np.zeros(n)
        tastes = [
            signals[name].astype(np.float64) @ entities.traits[f"{name}_projection"].T
            for name, entities in (("user_embedding", self.users), ("author_embedding", self.authors))
        ]
        return np.einsum("ij,ij->i", *tastes)

    def _logits(self, signals: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """[n, tasks] logits without the mood, and the tasks' mood loadings [tasks]."""
        x = self._inputs(signals)
        engage = sum(weight * x[name] for name, weight in ENGAGE.items())
        logits, moods = [], []
        for j, task in enumerate(self.layout.tasks):
            profile = _profile(task)
            logit = self.bias[j] + profile.engage * engage + sum(w * x[k] for k, w in profile.terms.items())
            if profile.gate:
                logit = np.where(x[profile.gate] > 0, logit, logit - 5.0)
            logits.append(logit)
            moods.append(profile.mood)
        return np.stack(logits, axis=1), np.array(moods)

    def _fit_truth(self, rng: np.random.Generator) -> None:
        """Standardizes the inputs and solves each task's bias for its base rate, on pilot rows."""
        tweets = self.tweets(rng, PILOT_EXAMPLES // 4)
        users, tweet_rows = self.impressions(rng, tweets, PILOT_EXAMPLES)
        signals = self._signals(rng, tweets, users, tweet_rows, tweets.traits["author"][tweet_rows])
        x = self._inputs(signals)
        self.standardize = {name: (x[name].mean(), x[name].std() or 1.0) for name in STANDARDIZED}
        logits, mood = self._logits(signals)
        self.bias = np.array(
            [
                _solve_bias(logits[:, j], mood[j], _profile(task).rate)
                for j, task in enumerate(self.layout.tasks)
            ]
        )


@dataclass
class _Recipe:
    """How the columns of one wide feature are drawn: each column's level (whose rows share its value),
    sparsity, scale and loading on its level's driving trait; and the kept columns, shuffled, where the
    truth's sources are planted."""

    role: str
    level: np.ndarray  # index into LEVELS, per column
    sparsity: np.ndarray  # continuous: chance of an exact zero; binary: chance of a 1
    mu: np.ndarray
    sigma: np.ndarray
    load: np.ndarray
    integer: np.ndarray  # counts, else real values
    categories: np.ndarray  # discrete
    planted: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, role: str, width: int, kept: np.ndarray) -> _Recipe:
        level = rng.choice(len(LEVELS), size=width, p=[0.3, 0.2, 0.25, 0.25])
        if role in ("binary", "other_int"):
            sparsity = np.exp(rng.uniform(np.log(0.003), np.log(0.3), width))
        else:
            sparsity = rng.beta(0.6, 0.8, width)
        return cls(
            role,
            level,
            sparsity,
            rng.uniform(-1.0, 5.0, width),
            rng.uniform(0.5, 2.0, width),
            rng.normal(0.0, 0.5, width).clip(-0.9, 0.9),
            rng.random(width) < 0.7,
            np.exp(rng.uniform(np.log(2), np.log(1000), width)).astype(np.int64),
            rng.permutation(kept),
        )

    def values(self, rng: np.random.Generator, level: str, driver: np.ndarray) -> np.ndarray:
        """[len(driver), columns of `level`] for entities whose driving trait is `driver`."""
        columns = np.flatnonzero(self.level == LEVELS.index(level))
        load = self.load[columns]
        z = load * driver[:, None] + np.sqrt(1 - load**2) * rng.standard_normal((len(driver), len(columns)))
        if self.role in ("binary", "other_int"):  # sparse flags
            return (z > ndtri(1 - self.sparsity[columns])).astype(np.float64)
        if self.role == "discrete":  # categories, small ids the most common
            return np.floor(self.categories[columns] * expit(1.7 * z) ** 3)
        value = np.exp(self.mu[columns] + self.sigma[columns] * z)  # heavy-tailed, with exact zeros
        value = np.where(self.integer[columns], np.floor(value), value)
        return np.where(rng.random(value.shape) < self.sparsity[columns], 0.0, value)

    def assemble(self, by_level: dict[str, np.ndarray], example_level: np.ndarray) -> np.ndarray:
        out = np.empty((len(example_level), len(self.level)))
        for i, level in enumerate(LEVELS):
            out[:, self.level == i] = by_level.get(level, example_level)
        return out


def _profile(task: str) -> TaskProfile:
    """A known task's profile, or one made up (deterministically, from the name) for any other label."""
    known = PROFILES.get(task.removeprefix("recap.engagement."))
    if known:
        return known
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    terms = dict(
        zip(("act", "pop", "fav", "aff", "act_x_fav"), rng.normal(0.0, 0.4, 5).tolist(), strict=True)
    )
    return TaskProfile(float(np.exp(rng.uniform(np.log(0.002), np.log(0.1)))), 0.8, terms)


def _solve_bias(logits: np.ndarray, mood: float, rate: float) -> float:
    """The b for which the mean planted probability of logits + b is `rate` (it increases with b)."""
    return brentq(lambda b: _integrate_mood(logits + b, mood).mean() - rate, -40.0, 40.0, xtol=1e-6)


def _integrate_mood(logits: np.ndarray, mood: np.ndarray | float) -> np.ndarray:
    """E[sigmoid(logit + mood * eta)] over the mood eta ~ N(0, MOOD_STD^2), by Gauss-Hermite quadrature."""
    total = np.zeros_like(logits)
    for node, weight in zip(np.sqrt(2) * MOOD_STD * _GH_NODES, _GH_WEIGHTS, strict=True):
        total += weight * expit(logits + mood * node)
    return total / np.sqrt(np.pi)


def _projection(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """[rows, width] with orthonormal rows of mean zero (where the width allows): an embedding keeps its
    latent's norm and averages 0, so the LayerNorm a ranker puts on it only rescales it."""
    a = rng.standard_normal((width, rows))
    if width > rows:
        a -= a.mean(axis=0)
    q = np.linalg.qr(a)[0]  # [width, min(width, rows)]
    return np.pad(q.T, ((0, rows - q.shape[1]), (0, 0)))  # latent dimensions beyond the width are lost


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, TASTE_DIMS))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(rng: np.random.Generator, n: int, low: int = 1 << 20) -> np.ndarray:
    return low + rng.choice((1 << 62) - low, size=n, replace=False)


def _normalized(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _kind(role: str | None, spec: FeatureSpec) -> str:
    """How a schema feature is filled: as a label, an id, an embedding, a wide feature, or by its dtype."""
    if role == "label" or role in META_IDS or role in EMBEDDINGS or role in WIDE:
        return role
    return {"float_list": "other_float", "int64_list": "other_int"}.get(spec.dtype, "other_bytes")


def _numpy_dtype(spec: FeatureSpec | None) -> type:
    return np.float32 if spec is None or spec.dtype == "float_list" else np.int64


def _as_written(values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """In the schema's dtype and length (a meta id or label the schema makes longer repeats)."""
    if values.shape[1] != spec.length:
        values = np.resize(values, (len(values), spec.length))
    return values if spec.dtype == "bytes_list" else values.astype(_numpy_dtype(spec))
