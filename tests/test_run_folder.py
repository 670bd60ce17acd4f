"""The run folder: its best marker is checked field by field, and nothing we write there follows a link."""

import json
import os
import threading

import pytest
import torch

from heavyranker.atomic import atomic_path, atomic_write
from heavyranker.checkpoint import resolve_checkpoint, save_checkpoint
from heavyranker.errors import UserError
from heavyranker.run_folder import BestMarker, NotAMarker, RunFolder

GOOD = {
    "step": 4,
    "split": "validation",
    "task": "mean",
    "metric": "rce",
    "value": 1.5,
    "evaluations_without_improvement": 0,
    "evaluated_step": 4,
}
PRECIOUS = b"precious"


def victim_link(tmp_path, path):
    """A symbolic link at `path` to a file outside the run folder: the victim."""
    victim = tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim)
    return victim


def link_error(path) -> str:
    return f"{path}: a symbolic link, which heavyranker does not write through; remove it"


def test_a_marker_reads_back_as_written(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.write_best(BestMarker(**GOOD))
    assert json.loads(run.best_marker.read_text()) == GOOD
    assert run.read_best() == BestMarker(**GOOD)
    assert run.best_marker == tmp_path / "run" / "checkpoints" / "best.json"


@pytest.mark.parametrize(
    "content, why",
    [
        ("[]", "[] is not a JSON object"),
        ('"a string"', '"a string" is not a JSON object'),
        ("null", "null is not a JSON object"),
        ("{}", "no step, split, task, metric, value, evaluations_without_improvement, evaluated_step"),
        (
            json.dumps({"step": 3}),
            "no split, task, metric, value, evaluations_without_improvement, evaluated_step",
        ),
        (json.dumps({**GOOD, "step": "4"}), 'step is "4", not of type int'),
        (json.dumps({**GOOD, "step": True}), "step is true, not of type int"),
        (json.dumps({**GOOD, "step": -1}), "step is -1, below 0"),
        (json.dumps({**GOOD, "value": None}), "value is null, not of type float"),
        (json.dumps({**GOOD, "value": float("nan")}), "value is nan, not a finite number"),
        (json.dumps({**GOOD, "task": 7}), "task is 7, not of type str"),
        (json.dumps({**GOOD, "evaluated_step": 2.5}), "evaluated_step is 2.5, not of type int"),
    ],
)
def test_a_marker_of_the_wrong_shape_is_one_error_naming_the_file(tmp_path, content, why):
    run = RunFolder(tmp_path)
    run.checkpoints.mkdir()
    run.best_marker.write_text(content)
    with pytest.raises(NotAMarker) as info:
        run.read_best()
    assert str(info.value) == (
        f"{run.best_marker}: not a best-checkpoint marker ({why}); remove it, or let train with "
        "training.keep_best write a new one"
    )
    with pytest.raises(NotAMarker):
        resolve_checkpoint(tmp_path, best=True)


def test_a_marker_that_is_not_json_is_one_error(tmp_path):
    run = RunFolder(tmp_path)
    run.checkpoints.mkdir()
    run.best_marker.write_bytes(b"\xff{")
    with pytest.raises(NotAMarker, match="best.json: not a best-checkpoint marker"):
        run.read_best()


@pytest.mark.parametrize("read", [True, False])
def test_a_link_at_the_best_marker_is_neither_read_nor_replaced(tmp_path, read):
    run = RunFolder(tmp_path / "run")
    victim = victim_link(tmp_path, run.best_marker)
    with pytest.raises(UserError) as info:
        run.read_best() if read else run.write_best(BestMarker(**GOOD))
    assert str(info.value) == link_error(run.best_marker)
    assert victim.read_bytes() == PRECIOUS and run.best_marker.is_symlink()


def test_a_checkpoint_is_not_written_over_a_link(tmp_path):
    run = RunFolder(tmp_path / "run")
    victim = victim_link(tmp_path, run.checkpoint(2))
    with pytest.raises(UserError) as info:
        save_checkpoint(run.checkpoints, 2, {"w": torch.zeros(1)})
    assert str(info.value) == link_error(run.checkpoint(2))
    assert victim.read_bytes() == PRECIOUS and run.checkpoint(2).is_symlink()


@pytest.mark.parametrize("opened", [atomic_write, atomic_path])
def test_a_link_at_the_temporary_of_an_atomic_write_is_not_written_through(tmp_path, opened):
    target = tmp_path / "run" / "metrics.jsonl"
    temporary = target.with_name(f".metrics.jsonl.tmp-{os.getpid()}-{threading.get_native_id()}")
    victim = victim_link(tmp_path, temporary)
    with pytest.raises(UserError) as info, opened(target) as f:
        if opened is atomic_path:
            f.write_bytes(b"new")  # a writer that opens the file itself
        else:
            f.write(b"new")
    assert str(info.value) == link_error(temporary)
    assert victim.read_bytes() == PRECIOUS and not target.exists()


@pytest.mark.parametrize("dangling", [False, True])
def test_the_lock_is_not_taken_through_a_link(tmp_path, dangling):
    run = RunFolder(tmp_path / "run")
    victim = victim_link(tmp_path, run.lock)
    if dangling:
        victim.unlink()
    with pytest.raises(UserError) as info, run.claim():
        pass
    assert str(info.value) == link_error(run.lock)
    assert (not victim.exists()) if dangling else victim.read_bytes() == PRECIOUS


def test_the_lock_file_is_private_to_its_owner(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.claim():
        assert run.lock.stat().st_mode & 0o777 == 0o600
        assert run.lock.read_text().startswith("pid ")
