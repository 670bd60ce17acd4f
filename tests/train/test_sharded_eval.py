"""Evaluation during a sharded run (train/sharded_eval.py) on 2 gloo processes: each rank evaluates its own
files on its shards, in step with the other although their shares differ in batches, with the metrics of a
replicated run; no rank holds a full table meanwhile; an error on one rank ends both."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from heavyranker.checkpoint import load_checkpoint
from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.errors import DataError
from heavyranker.eval import evaluator
from heavyranker.model import build_model
from heavyranker.run_folder import RunFolder
from heavyranker.train import sharded_eval
from heavyranker.train.loop import Trainer, train
from tests.test_runtime import TASKS, _cpu, on_two_ranks, train_config  # noqa: F401 (_cpu: autouse)
from tests.train.test_shard_init import Allocations
from tests.train.test_sharding import AUTHORS, USERS, _evaluating, _examples, data  # noqa: F401 (fixture)

pytest.importorskip("torchrec", reason="the torchrec extra (docs/sharding.md)")

# files[rank::2]: rank 0 reads part-0 and part-2 (64 + 24 examples, 11 batches of 8), rank 1 part-1 (8)
HELD = {"part-0": (64, 7), "part-1": (64, 8), "part-2": (24, 9)}  # examples, seed
FULL_TABLES = [[USERS, 8], [AUTHORS, 6]]  # test_sharding's tables' shapes


@pytest.fixture(scope="module")
def held(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """test_sharding's data with a validation split of 3 files, shared unevenly by 2 ranks."""
    folder = tmp_path_factory.mktemp("uneven") / "data"
    shutil.copytree(data, folder)
    (folder / "held").mkdir()
    for name, (n, seed) in HELD.items():
        write_records(str(folder / "held" / f"{name}.gz"), _examples(n, seed=seed))
    return folder


def _config(folder: Path, run: Path, sharding: str, num_eval_steps: int = -1, keep_best: bool = True) -> Path:
    """test_sharding's evaluating run (evaluations at steps 5 and 10) on the uneven split, checkpoints at
    both evaluations."""
    path = _evaluating(folder, run, sharding)
    config = yaml.safe_load(path.read_text())
    config["validation_data"]["held"]["inputs"] = str(folder / "held" / "*.gz")
    config["training"].update(num_eval_steps=num_eval_steps, checkpoint_every_n=5)
    if not keep_best:
        del config["training"]["keep_best"]
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(run: Path, step: int) -> dict:
    return json.loads(RunFolder(run).result("held", step).read_text())["metrics"]


def test_uneven_shares_evaluate_in_step_with_a_replicated_runs_metrics(held, tmp_path):
    """num_eval_steps 10: each rank its first 10 batches of 8 (rank 1 has 8, and runs fillers meanwhile), as
    a replicated run's ranks read them (rank 0 alone read 10 global batches of the whole split before)."""
    for sharding in ("torchrec", "replicated"):
        on_two_ranks(train_config, _config(held, tmp_path / sharding, sharding, 10), logs=tmp_path / "logs")
    for step in (5, 10):
        got, want = _metrics(tmp_path / "torchrec", step), _metrics(tmp_path / "replicated", step)
        assert [want[task]["num_examples"] for task in TASKS] == [80 + 64] * len(TASKS)
        assert got.keys() == want.keys() and len(got) == 2 * len(TASKS)  # each task, and by the stratifier
        for task, metrics in want.items():
            for name, value in metrics.items():
                assert got[task][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, task, name)
    best, replicated_best = (RunFolder(tmp_path / run).read_best() for run in ("torchrec", "replicated"))
    assert best is not None and replicated_best is not None and best.step == replicated_best.step
    for task, auroc in _sklearn_auroc(tmp_path / "torchrec", 10, num_eval_steps=10).items():
        assert _metrics(tmp_path / "torchrec", 10)[task]["auroc"] == pytest.approx(auroc, rel=1e-6)


def _sklearn_auroc(run: Path, step: int, num_eval_steps: int) -> dict[str, float]:
    """sklearn's AUROC of the checkpoint of `step` scoring, in one process, each rank's first batches."""
    config = load_config(run.with_suffix(".yaml"))
    model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks).eval()
    model.load_state_dict(load_checkpoint(run / "checkpoints" / f"step_{step}.pt")["model"])
    held, labels, scores = config.validation_data["held"], [], []
    for rank in (0, 1):
        with RecapDataset(held, seed=config.training.seed, rank=rank, world_size=2) as share, torch.no_grad():
            for batch in itertools.islice(share, num_eval_steps):
                labels.append(batch.labels[:, batch.columns(TASKS)])
                scores.append(model(batch.features)["probabilities"])
    y, p = torch.cat(labels).numpy(), torch.cat(scores).numpy()
    assert len(y) == 80 + 64
    return {task: roc_auc_score(y[:, i], p[:, i]) for i, task in enumerate(TASKS)}


def _train_recording_evaluations(config: Path, out: Path) -> None:
    """train, each evaluation under Allocations (meta tensors too); this rank's shapes into
    `out`/rank_<r>.json."""
    shapes: set[tuple[int, ...]] = set()
    evaluate = Trainer._evaluate

    def recorded(self: Trainer, logger: object) -> None:
        with Allocations(meta=True) as mode:
            evaluate(self, logger)
        shapes.update(mode.shapes)

    Trainer._evaluate = recorded  # this rank's process only
    train(load_config(config))
    (out / f"rank_{os.environ['RANK']}.json").write_text(json.dumps(sorted(shapes)))


def test_no_rank_holds_a_full_table_during_evaluation(held, tmp_path):
    config = _config(held, tmp_path / "run", "torchrec", keep_best=False)  # keep_best's save gathers
    on_two_ranks(_train_recording_evaluations, config, tmp_path, logs=tmp_path / "logs")
    for rank in (0, 1):
        shapes = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        assert [8, len(TASKS)] in shapes  # a batch's probabilities: the evaluation ran here, recorded
        assert not [shape for shape in shapes if shape in FULL_TABLES], rank
    assert _metrics(tmp_path / "run", 10)[TASKS[0]]["num_examples"] == 152


def _train_failing_on_rank_1(config: Path, where: str) -> None:
    """`heavyranker train` where rank 1's evaluation fails after 3 batches, reading (`where` "reading") or
    using them ("using"); every rank's command must end with the one-line error."""
    if os.environ["RANK"] == "1":
        if where == "reading":

            class Failing(RecapDataset):
                def __iter__(self):  # noqa: ANN204
                    for i, batch in enumerate(super().__iter__()):
                        if i == 3:
                            raise DataError("held/part-1.gz: record 24: injected damage")
                        yield batch

            evaluator.RecapDataset = Failing  # the evaluation's reader only (train reads with its own name)
        else:
            add, calls = evaluator.MetricAccumulator.add, []

            def failing_add(self, *args):  # noqa: ANN001, ANN202
                calls.append(1)
                if len(calls) == 3:
                    raise DataError("held/part-1.gz: record 24: injected damage")
                return add(self, *args)

            evaluator.MetricAccumulator.add = failing_add
    assert main(["train", "--config", str(config)]) != 0


@pytest.mark.parametrize("where", ["reading", "using"])
def test_an_error_on_one_rank_during_evaluation_ends_every_rank_with_it(held, tmp_path, where):
    config = _config(held, tmp_path / "run", "torchrec")
    on_two_ranks(_train_failing_on_rank_1, config, where, logs=tmp_path / "logs")  # fails on a hang
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank_{rank}.log").read_text()
        assert "error: held/part-1.gz: record 24: injected damage\n" in log, log[-2000:]
        assert "Traceback" not in log


def _train_failing_in_rank_1s_lookup(config: Path) -> None:
    """`heavyranker train` where rank 1's evaluation forward fails at its third call before its lookup,
    while rank 0 goes into the lookup's collective."""
    if os.environ["RANK"] == "1":
        init = sharded_eval.InStep.__init__

        def failing_init(self, forward, runtime, specs):  # noqa: ANN001, ANN202
            calls = []

            def failing(features):  # noqa: ANN001, ANN202
                calls.append(1)
                if len(calls) == 3:
                    raise DataError("injected: a lookup that fails on one rank")
                return forward(features)

            init(self, failing, runtime, specs)

        sharded_eval.InStep.__init__ = failing_init
    assert main(["train", "--config", str(config)]) != 0


def test_an_error_inside_one_ranks_lookup_ends_both_without_waiting_for_the_timeout(held, tmp_path):
    config = _config(held, tmp_path / "run", "torchrec")
    on_two_ranks(_train_failing_in_rank_1s_lookup, config, logs=tmp_path / "logs")  # fails on a hang
    failed, other = ((tmp_path / "logs" / f"rank_{rank}.log").read_text() for rank in (1, 0))
    assert "error: injected: a lookup that fails on one rank\n" in failed, failed[-2000:]
    # rank 0 cannot be told what (rank 1 left in the middle of a collective), only that rank 1 is gone
    assert "error: rank 0 of 2: another rank of this job is gone" in other, other[-2000:]
    assert "Traceback" not in failed + other
