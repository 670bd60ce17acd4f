"""The world the splits share: users and authors with hidden traits, a split's tweets and impressions,
the rows they make, and the planted truth's labels (the story is in __init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from ...errors import UserError
from .layout import EMBEDDINGS, META_IDS, WIDE, Layout, as_written, numpy_dtype
from .profiles import (
    DEMO,
    FLAG_INPUTS,
    LOG_INPUTS,
    MOOD_STD,
    SOURCES,
    STANDARDIZED,
    Truth,
    integrate_mood,
    solve_bias,
)
from .recipe import Recipe

ZIPF_EXPONENT = 1.0  # with id effects: the k-th most frequent user (author) is seen ~1/k as often
PILOT_EXAMPLES = 20_000  # rows that fix the truth's standardization and biases


@dataclass
class Entities:
    """Users, authors or a split's tweets: ids, hidden traits, values of their own level's columns."""

    ids: np.ndarray
    traits: dict[str, np.ndarray]
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # wide feature -> [n, its columns here]
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # as written, float32


class World:
    """Users, authors, how columns are drawn, and the planted truth: everything the splits share."""

    def __init__(
        self,
        layout: Layout,
        *,
        users: int,
        seed: int,
        truth: Truth = DEMO,
        id_effects: float = 0.0,
        authors: int | None = None,
    ):
        self.layout, self.truth = layout, truth
        rng = np.random.default_rng([seed, 1, *truth.salt])
        self.recipes = {}
        for role, width in self._wide_widths().items():
            self.recipes[role] = Recipe.draw(rng, role, width, layout.kept.get(role, np.arange(0)))
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
            taste=_unit(rng, users, truth.taste_dims),
        )
        authors = max(16, users // 4) if authors is None else authors
        self.authors = self._entities(
            rng,
            authors,
            "author",
            pop=rng.standard_normal(authors),
            tox=rng.standard_normal(authors),
            taste=_unit(rng, authors, truth.taste_dims),
        )
        if id_effects:
            self._plant_id_effects(np.random.default_rng([seed, 3]), id_effects)
        self.standardize: dict[str, tuple[float, float]] = {}
        self.bias = np.zeros(len(layout.tasks))
        self._fit_truth(np.random.default_rng([seed, 2, *truth.salt]))

    def _plant_id_effects(self, rng: np.random.Generator, scale: float) -> None:
        """Raw ids over all of int64 (negative ones too), Zipf-distributed frequencies, and a hidden effect
        per user and per author (N(0, scale) in logit units, added to the shared engagement score) that
        only an embedding of the id can learn. Its own random stream: without it, the data is unchanged."""
        for entities in (self.users, self.authors):
            n = len(entities.ids)
            ids = np.unique(rng.integers(-(2**63), 2**63 - 1, 2 * n, dtype=np.int64, endpoint=True))
            entities.ids = rng.permutation(ids[ids != -1])[:n]  # -1: the padding id of id tables
            entities.traits["zipf"] = (1.0 + rng.permutation(n)) ** -ZIPF_EXPONENT
            entities.traits["effect"] = scale * rng.standard_normal(n)

    def _wide_widths(self) -> dict[str, int]:
        """Widths of the wide features, and of the features nobody reads (filled by dtype, as one block)."""
        widths = {"other_float": 0, "other_int": 0}
        for name, spec in self.layout.specs.items():
            kind = self.layout.kind(name)
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
        author = rng.choice(
            len(pop), size=n, p=_normalized(np.exp(pop) * self.authors.traits.get("zipf", 1.0))
        )
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
        user_p = _normalized(np.exp(0.6 * self.users.traits["act"]) * self.users.traits.get("zipf", 1.0))
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
        affinity = cosine * np.sqrt(self.truth.taste_dims)  # ~N(0, 1)
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
            dtype = numpy_dtype(self.layout.spec(role))
            signals.update({source: drawn[source].astype(dtype) for source in planted})
        signals.update({k: v[users] for k, v in self.users.embeddings.items() if k == "user_embedding"})
        signals.update({k: v[author] for k, v in self.authors.embeddings.items()})
        if "effect" in u:
            signals["id_effect"] = u["effect"][users] + a["effect"][author]
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
            kind = self.layout.kind(name)
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
            out[name] = as_written(values, spec)
        return out

    def label_features(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The label columns of the rows, as written."""
        return {
            task: as_written(labels[:, [j]], self.layout.specs[task])
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
        return integrate_mood(logits, mood), labels

    def _inputs(self, signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The truth's inputs: counts (as the truth transforms them), flags, the embedding affinity, and
        their non-linear mixes."""
        n = len(next(iter(signals.values())))
        x = {
            name: self.truth.count_input(signals[source].astype(np.float64))
            if source in signals
            else np.zeros(n)
            for name, source in LOG_INPUTS.items()
        }
        x.update(
            {
                name: signals[source].astype(np.float64) if source in signals else np.zeros(n)
                for name, source in FLAG_INPUTS.items()
            }
        )
        x["aff"] = self._observed_affinity(signals, n)
        x["id_effect"] = signals.get("id_effect", np.zeros(n))
        for name, (center, scale) in self.standardize.items():
            x[name] = (x[name] - center) / scale
        self.truth.mixes(x)
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
        engage = sum(weight * x[name] for name, weight in self.truth.engage.items()) + x["id_effect"]
        logits, moods = [], []
        for j, task in enumerate(self.layout.tasks):
            profile = self.truth.task_profile(task)
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
                solve_bias(logits[:, j], mood[j], self.truth.task_profile(task).rate)
                for j, task in enumerate(self.layout.tasks)
            ]
        )


def _projection(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """[rows, width] with orthonormal rows of mean zero (where the width allows): an embedding keeps its
    latent's norm and averages 0, so the LayerNorm a ranker puts on it only rescales it."""
    a = rng.standard_normal((width, rows))
    if width > rows:
        a -= a.mean(axis=0)
    q = np.linalg.qr(a)[0]  # [width, min(width, rows)]
    return np.pad(q.T, ((0, rows - q.shape[1]), (0, 0)))  # latent dimensions beyond the width are lost


def _unit(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    x = rng.standard_normal((n, dims))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(rng: np.random.Generator, n: int, low: int = 1 << 20) -> np.ndarray:
    return low + rng.choice((1 << 62) - low, size=n, replace=False)


def _normalized(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()
