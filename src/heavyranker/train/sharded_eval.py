"""Evaluation during training with sharded tables (training.embedding_sharding: torchrec): every rank scores
its own share of a split on the shards, as a replicated run's ranks do, and no table is gathered.

A sharded lookup is a collective: every rank must run it as many times as the others. The ranks' shares of
a split differ in batches, so they go in rounds: each round one all-reduce tells every rank whether any rank
still has a batch, and whether any rank failed; a rank out of batches scores a filler (one example of zeros,
whose outputs count in no metric) so that the others' lookups complete; no rank having a batch ends the
rounds. A failure reading a batch, or in the caller's use of its outputs, reaches the other ranks in the
round they wait in, and every rank raises it, rather than the others waiting forever. A failure in the
forward itself ends this rank's process without a round (see _Rounds._forward): the others then fail on
its closed connection, with a line that says another rank is gone."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..data.batch import Batch, Spec
from ..eval.evaluator import Scored
from ..runtime import Runtime

Forward = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class InStep:
    """An evaluator's Scoring (eval/evaluator.py) with `forward`, a model whose lookups are collectives, on
    every rank of `runtime`. `specs`: the features the model reads, for the filler."""

    def __init__(self, forward: Forward, runtime: Runtime, specs: dict[str, Spec]):
        self.forward, self.runtime = forward, runtime
        self.filler = {
            name: torch.zeros((1, *spec.shape), dtype=spec.dtype, device=runtime.device)
            for name, spec in specs.items()
        }

    @contextmanager
    def __call__(self, batches: Iterable[Batch]) -> Iterator[Scored]:
        rounds = _Rounds(self, iter(batches))
        try:
            yield rounds
        except Exception as error:
            rounds.fail(error)
            raise


class _Rounds:
    """This rank's batches with their outputs, one per round; fillers run in between where it has none."""

    def __init__(self, in_step: InStep, batches: Iterator[Batch]):
        self.in_step, self.batches = in_step, batches
        self.open = True  # the other ranks are still in rounds, or will come to the next one

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        while True:
            batch, error = self._next()
            if not self._agree(batch is not None, error):
                self.open = False
                return
            if batch is None:
                self._forward(self.in_step.filler)  # for the others' lookups: its outputs count nowhere
            else:
                yield batch, self._forward(batch.features)

    def _forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's forward. After an error in it this rank cannot know how far the others went into its
        lookup's collectives, so it tells them nothing (a round's all-reduce would meet their lookup and
        wait out the collective timeout) and its error ends its process; the others' collective then fails
        on the closed connection, in one line (runtime.distributed_runtime)."""
        try:
            return self.in_step.forward(features)
        except Exception:
            self.open = False
            raise

    def fail(self, error: Exception) -> None:
        """This rank's error outside a round's agreement: told in the round the others wait in, so that they
        raise it too (this rank raises its own)."""
        if self.open:
            self._agree(False, error, raising=False)

    def _next(self) -> tuple[Batch | None, Exception | None]:
        try:
            batch = next(self.batches, None)
            return (None if batch is None else batch.to(self.in_step.runtime.device)), None
        except Exception as error:
            return None, error

    def _agree(self, has_batch: bool, error: Exception | None, raising: bool = True) -> bool:
        """Whether any rank has a batch this round; raises an error any rank had (every rank takes part)."""
        runtime = self.in_step.runtime
        flags = torch.tensor([float(has_batch), float(error is not None)], device=runtime.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        anyone_has_batch, anyone_failed = bool(flags[0]), bool(flags[1])
        if not anyone_failed:
            return anyone_has_batch
        self.open = False
        errors = [e for e in runtime.gather(None if error is None else _portable(error)) if e is not None]
        if raising:
            raise error if error is not None else errors[0]
        return False


def _portable(error: Exception) -> Exception:
    """`error`, or where it does not survive pickling (for the other ranks) a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
