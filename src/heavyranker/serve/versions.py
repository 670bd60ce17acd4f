"""Hot swap: `serve --repository` serves the newest complete version of a model repository (repository.py)
and swaps in each newer one while it serves.

A watcher thread polls the repository every poll_seconds. A version to serve (the newest, or the pinned one)
is loaded beside the served one, its program's hash checked (Scorer), its inputs and tasks compared with the
served version's (a client's request must still fit), and warmed up with one forward at the largest batch;
then `current` is replaced, one attribute assignment, which every request reads once when it starts: a
request in flight finishes on the version it started with, whose scorer it holds. So at most two versions
are in memory: the served one and the one being loaded (plus, for the moments its last requests take, the
one just replaced, which is freed and its memory handed back to the OS as soon as none holds it: at the
swap, else at the next poll).

A version that fails to load is logged, counted and not tried again (unless its READY marker changes); the
served one keeps serving. So at the start: a server (re)started while the newest version is damaged serves
the newest one below it that loads. When the served version's folder disappears, the newest complete one
below it is loaded instead (a rollback by deleting the bad version). A repository that disappears, or holds
no complete version, leaves the served version serving, with a warning in the log. So does a store or file
system that fails (an OSError: the object store away, a download cut half way): one warning while it lasts,
the version it kept from fetching tried again at each poll (not counted as failed), and a line when it works
again.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..memory import return_freed_memory
from .precision import warn_if_slow_here
from .repository import ModelRepository
from .scorer import Scorer

log = logging.getLogger(__name__)

# What can fail for a while (the store or the file system away), warned about once until it works again.
POLL, FETCH, MARK = "polling the repository", "fetching a version", "marking the served version"


@dataclass(frozen=True)
class Loaded:
    version: int | None  # None: a model folder served alone, not from a repository
    folder: Path
    scorer: Scorer
    published: float | None = None  # when it was published in the repository (time.time())


class ServedVersions:
    """`current`: the Loaded version being served. `start(poll_seconds)` runs the watcher (repository only),
    `stop()` ends it. `on_swap()` and `on_failed_load()` are called for each swap and each failed load."""

    def __init__(
        self,
        current: Loaded,
        repository: ModelRepository | None = None,
        *,
        pin_version: int | None = None,
        warm_batch: int = 1,
        on_swap: Callable[[], None] = lambda: None,
        on_failed_load: Callable[[], None] = lambda: None,
    ):
        warn_if_slow_here(current.scorer.precision)
        self.current = current
        self.repository = repository
        self.pin_version = pin_version
        self.warm_batch = warm_batch
        self.on_swap, self.on_failed_load = on_swap, on_failed_load
        self._failed: dict[int, object] = {}  # version -> its READY's stamp when it failed
        self._missing_logged = False
        self._warned: dict[str, str] = {}  # what fails (POLL, FETCH, MARK) -> the warning logged
        self._swapped_out: weakref.ref[Scorer] | None = None  # until it is freed (_free_swapped_out)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ServedVersions:
        return cls(Loaded(None, Path(folder), Scorer(folder)))

    @classmethod
    def from_repository(
        cls, repository: ModelRepository, *, pin_version: int | None = None
    ) -> ServedVersions:
        """Serving the pinned version, else the newest complete one; a UserError if there is none."""
        versions = repository.versions()
        if pin_version is not None and pin_version not in versions:
            raise UserError(
                f"{repository.folder}: no complete version {pin_version} (it has {versions or 'none'})"
            )
        if not versions:
            raise UserError(
                f"{repository.folder}: no complete version to serve (export one with "
                f"`heavyranker export --repository {repository.root} --model-name {repository.model_name}`)"
            )
        if pin_version is not None:
            served = cls(_loaded(repository, pin_version), repository, pin_version=pin_version)
        else:
            served = cls._newest_that_loads(repository, versions)
        served._mark()
        return served

    @classmethod
    def _newest_that_loads(cls, repository: ModelRepository, versions: list[int]) -> ServedVersions:
        """The newest version that loads, as the watcher would fall back to it: a damaged newest version
        must not keep a restarted server from serving the good one below it. Those that fail are logged
        and, as the watcher's, not tried again; if none loads, a UserError names each one's reason."""
        failed: dict[int, tuple[object, Exception]] = {}
        for version in versions[::-1]:
            try:
                loaded = _loaded(repository, version)
            except Exception as e:  # whatever a damaged folder raises, as in refresh()
                failed[version] = (repository.ready_stamp(version), e)
                log.error("version %d cannot be served (%s): trying the version below", version, e)
                continue
            served = cls(loaded, repository)
            served._failed = {v: stamp for v, (stamp, _) in failed.items()}
            return served
        reasons = "; ".join(f"version {v}: {e}" for v, (_, e) in failed.items())
        raise UserError(f"{repository.folder}: no version can be served: {reasons}")

    @property
    def failed_versions(self) -> list[int]:
        """The versions that failed to load and are not tried again (until their READY changes)."""
        return sorted(self._failed)

    def start(self, poll_seconds: float) -> None:
        if self.repository is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(poll_seconds,), name="versions", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.repository is not None:
            self.repository.unmark_served()

    def refresh(self) -> None:
        """One poll: swaps in the version to serve if it is not the served one and loads."""
        assert self.repository is not None
        versions = self.repository.versions()
        served = self.current.version
        if not versions:
            if not self._missing_logged:
                log.warning(
                    "%s: no complete version (the repository was deleted?): keeping version %s",
                    self.repository.folder,
                    served,
                )
                self._missing_logged = True
            return
        self._missing_logged = False
        self._recovered(POLL)
        # Those no longer there are let go: a loop that publishes versions that fail (another model's inputs)
        # every few minutes, their retention removing them, would grow this for the server's life.
        self._failed = {v: stamp for v, stamp in self._failed.items() if v in versions}
        self._mark()
        wanted = [self.pin_version] if self.pin_version is not None else versions[::-1]
        for version in wanted:
            if version == served:
                return
            if version not in versions or self._failed.get(version) == self.repository.ready_stamp(version):
                continue
            try:
                loaded = self._load(version)
            except OSError as e:  # the store or the disk, not the version: it is tried again at the next poll
                self._warn(FETCH, f"cannot fetch version {version} ({e}): keeping version {served}")
                return
            except (
                Exception
            ) as e:  # whatever a damaged or foreign folder raises: the served one keeps serving
                self._failed[version] = self.repository.ready_stamp(version)
                self.on_failed_load()
                log.error("version %d cannot be served (%s): keeping version %s", version, e, served)
                continue
            old, self.current = self.current, loaded
            self._mark()
            self.on_swap()
            log.info("now serving version %d (was %s)", version, served)
            self._recovered(FETCH)
            self._swapped_out = weakref.ref(old.scorer)
            del old
            self._free_swapped_out()
            return

    def _load(self, version: int) -> Loaded:
        assert self.repository is not None
        folder = self.repository.local_folder(version)
        scorer = Scorer(folder)
        warn_if_slow_here(scorer.precision)
        serving = self.current.scorer
        if scorer.inputs != serving.inputs:
            raise UserError(f"{folder}: its inputs differ from the served version's: {_inputs(scorer)}")
        if scorer.tasks != serving.tasks:
            raise UserError(
                f"{folder}: its tasks differ from the served version's: {', '.join(scorer.tasks)}"
            )
        scorer.warm_up((self.warm_batch,))
        return Loaded(version, folder, scorer, self.repository.published(version))

    def poll(self) -> None:
        """One poll of the watcher: refresh(), whose failure leaves the served version serving. The store or
        the file system away (an OSError) is one line in the log while it lasts, not one a poll."""
        try:
            self.refresh()
        except OSError as e:
            where = self.repository.folder if self.repository else None
            self._warn(POLL, f"polling {where} failed ({e}): keeping version {self.current.version}")
        except Exception:  # a poll that fails must not end the watcher
            log.exception("polling %s failed", self.repository.folder if self.repository else None)
        self._free_swapped_out()

    def _free_swapped_out(self) -> None:
        """Frees the version swapped out once no request holds it (after the swap, else at a later poll) and
        hands the memory back to the OS. A torch program is cyclic garbage (its graph and modules point at
        each other), which only a full collection frees: Python's own came rarely, so a server held up to
        a few swapped-out versions at a time; and freed, a model's smaller tensors stay in glibc's heap
        (memory.return_freed_memory). Over many swaps, RSS moved by up to a model's size a swap
        (bench/serve_soak.py). The collection holds the interpreter while it runs, once a swap: 0.3 to 0.45
        s in a local_prod server, measured on a loaded 2-CPU machine."""
        swapped_out = self._swapped_out  # once: a test's refresh() may run beside the watcher's poll
        if swapped_out is None:
            return
        gc.collect()
        if swapped_out() is None:
            if self._swapped_out is swapped_out:
                self._swapped_out = None
            return_freed_memory()

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            self.poll()

    def _warn(self, what: str, message: str) -> None:
        """A warning about `what` (POLL, FETCH, MARK), logged when it differs from the last one about it."""
        if self._warned.get(what) != message:
            log.warning(message)
            self._warned[what] = message

    def _recovered(self, what: str) -> None:
        if self._warned.pop(what, None) is not None:
            log.info("%s works again: serving version %s", what, self.current.version)

    def _mark(self) -> None:
        """Retention keeps the served version while this process serves it."""
        assert self.repository is not None and self.current.version is not None
        try:
            self.repository.mark_served(self.current.version)
        except OSError as e:  # a read-only repository: serving goes on, retention does not know of it
            self._warn(
                MARK, f"cannot mark version {self.current.version} as served in {self.repository}: {e}"
            )
            return
        self._recovered(MARK)


def _loaded(repository: ModelRepository, version: int) -> Loaded:
    """A version as a server starts with it (the watcher's swaps check it against the served one too)."""
    folder = repository.local_folder(version)
    return Loaded(version, folder, Scorer(folder), repository.published(version))


def _inputs(scorer: Scorer) -> str:
    return ", ".join(f"{spec.name} {list(spec.shape)} {spec.dtype}" for spec in scorer.inputs)
