import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from heavyranker.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint, save_checkpoint
from heavyranker.errors import UserError
from heavyranker.run_folder import BestMarker, RunFolder, list_checkpoints
from tests.conftest import FullDisk

# A child that saves step 2 but hangs inside fsync, i.e. after writing part of the file, until killed.
HANGING_WRITER = """
import os, sys, time, torch
from heavyranker import checkpoint
def hang(fd):
    open(sys.argv[2], "w").close()
    time.sleep(600)
os.fsync = hang
checkpoint.save_checkpoint(sys.argv[1], 2, {"w": torch.ones(1000, 1000)})
"""


def test_kill_during_write_leaves_previous_checkpoint_newest(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    flag = tmp_path.parent / f"{tmp_path.name}-writing"
    child = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, str(tmp_path), str(flag)])
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert time.monotonic() < deadline and child.poll() is None, "the writer never reached fsync"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert any(
        re.fullmatch(rf"\.step_2\.pt\.tmp-{child.pid}-[0-9]+", name) for name in os.listdir(tmp_path)
    )  # the half file is there...
    newest = RunFolder.of_checkpoints(tmp_path).newest_checkpoint()
    assert torch.equal(load_checkpoint(newest)["w"], torch.zeros(3))  # ...and ignored


def test_a_full_disk_is_one_error_naming_the_file_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda state, f: real_save(state, FullDisk(f, room=1000)))
    with pytest.raises(UserError) as info:
        save_checkpoint(tmp_path, 2, {"w": torch.ones(1000)})
    assert str(info.value) == f"{tmp_path}/step_2.pt: cannot write the checkpoint: No space left on device"
    assert os.listdir(tmp_path) == ["step_1.pt"]  # no partial file
    assert torch.equal(load_checkpoint(tmp_path / "step_1.pt")["w"], torch.zeros(3))


def test_max_to_keep_removes_the_oldest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, {"step": step})
        RunFolder.of_checkpoints(tmp_path).prune(max_to_keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [15, 20]


def test_steps_sort_numerically_not_as_text(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint(tmp_path, step, {})
    assert RunFolder.of_checkpoints(tmp_path).newest_checkpoint().name == "step_100.pt"


def test_loading_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "step_1.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(UserError, match="step_1.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="step_3.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_weight_mismatch_names_each_parameter():
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1)).state_dict()
    target = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 1))
    with pytest.raises(UserError) as info:
        load_model_weights(target, source, "run-a")
    message = str(info.value)
    assert "0.weight: shape (3, 4) in the checkpoint, (5, 4) in the model" in message
    assert "1.weight: shape (1, 3) in the checkpoint, (1, 5) in the model" in message
    assert "0.bias" in message and "1.bias" not in message


def test_a_checkpoint_of_another_model_names_its_first_misfits_of_each_kind():
    # Was every misfit: 1-3 kB on one line for a checkpoint of another model.
    source = {f"{i}.weight": torch.zeros(1) for i in range(8)}
    with pytest.raises(UserError) as info:
        load_model_weights(nn.Linear(2, 1), source, "run-a")
    assert str(info.value) == (
        "run-a does not fit this model: missing weight, bias; unexpected 0.weight, 1.weight, 2.weight "
        "(and 5 more)"
    )
    wide = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    with pytest.raises(UserError) as info:
        load_model_weights(wide, nn.Sequential(*[nn.Linear(3, 2) for _ in range(4)]).state_dict(), "run-b")
    assert str(info.value) == (
        "run-b does not fit this model: 0.weight: shape (2, 3) in the checkpoint, (2, 2) in the model; "
        "1.weight: shape (2, 3) in the checkpoint, (2, 2) in the model; "
        "2.weight: shape (2, 3) in the checkpoint, (2, 2) in the model (and 1 more)"
    )


def test_resolve_finds_newest_in_a_run_folder(tmp_path):
    save_checkpoint(tmp_path / "checkpoints", 4, {})
    save_checkpoint(tmp_path / "checkpoints", 8, {})
    assert resolve_checkpoint(tmp_path).name == "step_8.pt"
    with pytest.raises(UserError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_max_to_keep_spares_the_kept_step_and_resolve_takes_the_marked_best(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 4, 6):
        save_checkpoint(run.checkpoints, step, {})
        run.prune(max_to_keep=1, keep=2)
    assert [step for step, _ in list_checkpoints(run.checkpoints)] == [2, 6]
    assert resolve_checkpoint(tmp_path, best=True).name == "step_6.pt"  # no marker: the newest
    run.write_best(marker(step=2))
    assert resolve_checkpoint(tmp_path, best=True).name == "step_2.pt"
    assert resolve_checkpoint(tmp_path).name == "step_6.pt"
    run.write_best(marker(step=4))
    with pytest.raises(UserError, match="best.json marks step_4.pt as the best checkpoint, but there is no"):
        resolve_checkpoint(tmp_path, best=True)


def marker(step: int) -> BestMarker:
    return BestMarker(step, "validation", "mean", "rce", 1.0, 0, evaluated_step=step)


@pytest.mark.parametrize(
    "name", ["step_\u0663.pt", "step_\u00b3.pt", "step_3.pt\n", "step_+3.pt", "step_03.pt"]
)
def test_a_name_that_is_almost_a_step_is_no_checkpoint(tmp_path, name):
    # int() and re's \d take Arabic-Indic digits ("\u0663" is 3) and re's $ a final newline: a file so
    # named would be the newest checkpoint, or name a file that is not there.
    save_checkpoint(tmp_path, 2, {})
    (tmp_path / name).write_bytes(b"planted")
    assert list_checkpoints(tmp_path) == [(2, tmp_path / "step_2.pt")]


@pytest.mark.parametrize("state", [torch.zeros(3), [1, 2]])
def test_a_file_that_holds_no_dict_is_no_checkpoint(tmp_path, state):
    # `"model" in state` on a tensor raised a RuntimeError: a traceback for a file of another program.
    torch.save(state, tmp_path / "step_5.pt")
    with pytest.raises(
        UserError, match=r"step_5\.pt: not a heavyranker checkpoint \(it holds a (Tensor|list)"
    ):
        load_checkpoint(tmp_path / "step_5.pt")
