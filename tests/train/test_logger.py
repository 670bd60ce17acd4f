import json
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from heavyranker.errors import UserError
from heavyranker.run_folder import RunFolder
from heavyranker.train import logger as logger_module
from heavyranker.train.logger import TrainLogger


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_tells_the_evaluation_cross_entropy_from_the_training_loss(tmp_path):
    logger = TrainLogger(RunFolder(tmp_path))
    logger.add(torch.tensor(0.5), torch.tensor([0.25, 0.75]), examples=8, seconds=2.0)
    logger.flush(3, ["a", "b"], {"backbone": 0.125})
    logger.eval_scalars(3, {"val": {"a": {"auroc": 0.75, "loss": 0.625}, "a/s1": {"loss": 1.5}}})
    logger.close()
    assert scalars(tmp_path / "tensorboard") == {
        "train/loss": [(3, 0.5)],
        "train/loss/a": [(3, 0.25)],
        "train/loss/b": [(3, 0.75)],
        "train/lr/backbone": [(3, 0.125)],
        "train/steps_per_s": [(3, 0.5)],
        "train/examples_per_s": [(3, 4.0)],
        "eval/val/a/auroc": [(3, 0.75)],
        "eval/val/a/cross_entropy": [(3, 0.625)],
        "eval/val/a/s1/cross_entropy": [(3, 1.5)],
    }


def log_steps(logger: TrainLogger, steps, loss: float) -> None:
    for step in steps:
        logger.add(torch.tensor(loss), torch.tensor([loss]), examples=1, seconds=1.0)
        logger.flush(step, ["a"], {})


def test_a_resumed_logger_drops_what_was_logged_past_its_step(tmp_path, monkeypatch):
    # TensorBoard reads event files in the order of their names, which start with the time in seconds: the
    # killed run's must sort first, as a real one's would.
    with monkeypatch.context() as earlier:
        earlier.setattr(time, "time", lambda: 1e9)
        first = TrainLogger(RunFolder(tmp_path))
        log_steps(first, [1, 2, 3, 4], loss=0.5)
        first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed while writing a line
    resumed = TrainLogger(RunFolder(tmp_path), resume_step=2)
    log_steps(resumed, [3, 4], loss=0.25)
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 0.5), (2, 0.5), (3, 0.25), (4, 0.25)]
    assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 0.5), (2, 0.5), (3, 0.25), (4, 0.25)]


def test_a_last_line_written_whole_but_for_its_newline_is_not_joined_to_the_next(tmp_path):
    # A write cut short just before the "\n" (a full disk, a kill) left JSON that parses: appending to it
    # made one line of two, which no JSON reader takes.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.5}')
    resumed = TrainLogger(RunFolder(tmp_path), resume_step=2)
    log_steps(resumed, [3], loss=0.25)
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 0.5), (3, 0.25)]


@pytest.mark.parametrize("line", ['{"loss": 1}', "[1, 2]", '{"step": "2"}', '"text"'])
def test_a_line_train_does_not_write_is_one_error_naming_file_and_line(tmp_path, line):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(f'{{"step": 1, "loss": 0.5}}\n{line}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl: line 2 is not a line train writes"):
        TrainLogger(RunFolder(tmp_path), resume_step=2)
    assert metrics.read_text() == f'{{"step": 1, "loss": 0.5}}\n{line}\n'  # left as it was


def test_a_log_that_is_not_text_is_one_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl: not a training log"):
        TrainLogger(RunFolder(tmp_path), resume_step=2)


def test_a_resume_reads_the_log_back_from_its_end_only(tmp_path, monkeypatch):
    # Was every line parsed, and the whole file read and written again: a follow run's log grows for weeks,
    # and each restart took time and memory in proportion to it.
    (tmp_path / "metrics.jsonl").write_text(
        "".join(f'{{"step": {step}, "loss": 0.5}}\n' for step in range(1, 1001))
    )
    parsed, step_of = [], logger_module._step
    monkeypatch.setattr(
        logger_module, "_step", lambda *args: parsed.append(args[-1]) or step_of(*args)
    )  # the line
    TrainLogger(RunFolder(tmp_path), resume_step=998).close()
    assert [json.loads(line)["step"] for line in parsed] == [1000, 999, 998]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 999))
