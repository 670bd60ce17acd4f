"""restore_weights: the one way a command puts a checkpoint's weights into the model it built."""

import os

import pytest
import torch
from torch import nn

from heavyranker.errors import UserError
from heavyranker.model import restore_weights
from tests.conftest import CONFIGS, SMALL_SPLITS


def save(path, state):
    torch.save(state, path)
    return path


def test_copies_the_weights_and_returns_the_whole_state(tmp_path):
    source = nn.Linear(3, 2)
    path = save(tmp_path / "step_7.pt", {"model": source.state_dict(), "step": 7})
    target = nn.Linear(3, 2)
    state = restore_weights(target, path)
    assert state["step"] == 7
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_a_checkpoint_without_weights_is_named(tmp_path):
    path = save(tmp_path / "step_1.pt", {"step": 1})
    with pytest.raises(UserError, match=r"step_1.pt: no 'model' weights in this checkpoint"):
        restore_weights(nn.Linear(3, 2), path)


def test_weights_of_another_model_name_the_misfit_then_the_hint(tmp_path):
    path = save(tmp_path / "step_1.pt", {"model": nn.Linear(4, 2).state_dict(), "step": 1})
    model = nn.Linear(3, 2)
    before = model.weight.clone()
    with pytest.raises(
        UserError, match=r"step_1.pt does not fit this model: weight: shape \(2, 4\).*\(try B\)$"
    ):
        restore_weights(model, path, misfit_hint="try B")
    assert torch.equal(model.weight, before)  # nothing copied
    with pytest.raises(
        UserError,
        match=r"does not fit this model: weight: shape \(2, 4\) in the checkpoint, \(2, 3\) in the model$",
    ):
        restore_weights(model, path)


def _managed_state():
    """A managed table of 4 rows (3 ids of their own) after two batches, lfu: its buffers."""
    from heavyranker.config.embeddings import Eviction
    from heavyranker.model.id_managed import ManagedMapping

    mapping = ManagedMapping(4, 1, Eviction.LFU, None)
    mapping(torch.tensor([[10, 20, 30]]))
    mapping(torch.tensor([[40, 10]]))
    return mapping


@pytest.mark.parametrize(
    ("buffer", "value", "message"),
    [
        ("row_last", -5, r"row_last has a sighting after tick"),
        ("row_last", 2**40, r"row_last has a sighting after tick"),
        ("candidate_count", -1, r"candidate_count has a negative count"),
        ("tick", -10, r"tick is negative"),
        ("num_resident", 99, r"num_resident is 99, but row_used marks 3 rows"),
        ("recent_rows", 99, r"recent_rows has a row out of range"),
        ("recent_ids", 2**62, r"recent_ids is not strictly ascending"),
    ],
)
def test_a_damaged_managed_table_is_one_line_naming_the_file_and_buffer(tmp_path, buffer, value, message):
    """Before: a negative count or sighting was numpy's ValueError traceback at the first batch, a sighting
    of 2**40 a MemoryError (8 TiB for its histogram), a negative tick an IndexError, and rows or a size out
    of place loaded silently."""
    from heavyranker.errors import DataError

    state = {f"mapping.{k}": v.clone() for k, v in _managed_state().state_dict().items()}
    tensor = state[f"mapping.{buffer}"]
    tensor.view(-1)[0] = value
    path = save(tmp_path / "step_2.pt", {"model": state, "step": 2})
    model = nn.Module()
    model.mapping = _managed_state()
    with pytest.raises(DataError, match=rf"^\S*step_2.pt: a damaged managed id table: mapping.{message}"):
        restore_weights(model, path)
        model.mapping(torch.tensor([[50, 60, 70]]))


def test_an_undamaged_managed_table_loads_and_maps_the_same():
    source = _managed_state()
    target = _managed_state().__class__(4, 1, source.eviction, None)
    target.load_state_dict(source.state_dict())
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    assert torch.equal(target.lookup(ids), source.lookup(ids))


def test_a_checkpoint_of_the_first_managed_layout_restores(tmp_path):
    """A checkpoint from before the recent part (no recent_ids, recent_rows, num_recent, num_vacated: every
    resident id in sorted_ids) maps as it did. Before: restore_weights refused it ("missing recent_ids; ..."),
    though the table's own load took it: resume, evaluate and export could not read such a checkpoint."""
    from heavyranker.model.managed_state import SPLIT_STATE

    source = _managed_state()
    resident = sorted(source.resident().items())  # the first layout: all of them in the main part
    state = {k: v.clone() for k, v in source.state_dict().items() if k not in SPLIT_STATE}
    state["sorted_ids"][: len(resident)] = torch.tensor([pair[0] for pair in resident])
    state["sorted_rows"][: len(resident)] = torch.tensor([pair[1] for pair in resident])
    path = save(tmp_path / "step_2.pt", {"model": {f"table.mapping.{k}": v for k, v in state.items()}})
    model = nn.Module()
    model.table = nn.Module()
    model.table.mapping = source.__class__(4, 1, source.eviction, None)
    restore_weights(model, path)
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    assert model.table.mapping.lookup(ids).tolist() == [[dict(resident).get(i, 0) for i in ids[0].tolist()]]
    assert int(model.table.mapping.num_recent) == 0


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (5, r"step_1.pt: its 'model' is not a dict of tensors"),
        ({"weight": "abc", "bias": torch.zeros(2)}, r"step_1.pt: its 'model' is not a dict of tensors"),
        (
            {"weight": torch.zeros(2, 3, dtype=torch.int64), "bias": torch.zeros(2)},
            r"step_1.pt does not fit this model: weight: dtype torch.int64 in the checkpoint, torch.float32",
        ),
    ],
)
def test_weights_that_are_not_the_models_tensors_are_one_line(tmp_path, weights, message):
    """Before: a TypeError or AttributeError traceback, and an integer tensor silently cast into a float
    weight (or a float into an id buffer, rounded)."""
    path = save(tmp_path / "step_1.pt", {"model": weights, "step": 1})
    with pytest.raises(UserError, match=message):
        restore_weights(nn.Linear(3, 2), path)


def test_weights_of_another_float_precision_are_cast_to_the_models(tmp_path):
    """A bf16 checkpoint (another program's: ours are fp32) is of the same kind: it loads, cast to fp32."""
    source = nn.Linear(3, 2).to(torch.bfloat16)
    path = save(tmp_path / "step_1.pt", {"model": source.state_dict(), "step": 1})
    target = nn.Linear(3, 2)
    restore_weights(target, path)
    assert target.weight.dtype == torch.float32 and torch.equal(target.weight, source.weight.float())


def test_a_mapped_restore_copies_the_weights_and_leaves_the_rest_in_the_file(tmp_path):
    source = nn.Linear(3, 2)
    adam = torch.optim.Adam(source.parameters())
    source(torch.ones(1, 3)).sum().backward()
    adam.step()
    path = save(tmp_path / "step_1.pt", {"model": source.state_dict(), "optimizer": adam.state_dict()})
    target = nn.Linear(3, 2)
    state = restore_weights(target, path, mapped=True)
    moments = state["optimizer"]["state"][0]["exp_avg"]
    assert mapped_from(moments, path)  # never read unless touched
    assert torch.equal(moments, adam.state_dict()["state"][0]["exp_avg"])
    assert not mapped_from(target.weight, path)  # the model's own memory: a copy
    del state, moments
    path.unlink()
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether the tensor's memory is a mapping of the file at `path`, as the kernel lists them (Linux)."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps").read().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) == 6 and fields[5] == str(path) and start <= address < end:
            return True
    return False


@pytest.fixture(scope="module")
def small_run(small_data, tmp_path_factory):
    from heavyranker.cli import main

    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", str(CONFIGS / "local_small.yaml"), *small_sets(small_data, run)]) == 0
    return run


def small_sets(small_data, run) -> list[str]:
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"training.save_dir={run}"]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    sets += ["training.num_train_steps=1"]
    return [arg for value in sets for arg in ("--set", value)]


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("heavyranker.eval.evaluator", ["evaluate"]),
        ("heavyranker.serve.export", ["export", "--out", "{tmp}/model"]),
        ("heavyranker.eval.compare", ["compare", "{run}", "{run}", "--resamples", "100"]),
    ],
)
def test_the_commands_that_need_the_weights_only_leave_the_optimizer_state_unread(
    small_data, small_run, tmp_path, monkeypatch, module, command
):
    """evaluate, export and compare: with Adam, 2 of a checkpoint's 3 copies of the parameters are its
    moments, which they never need (measured: evaluate's peak resident memory 2.30 -> 1.30 GB on a 1.54 GB
    checkpoint)."""
    from heavyranker.cli import main

    states = []

    def keeping_the_state(*args, **kwargs):
        states.append(restore_weights(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(f"{module}.restore_weights", keeping_the_state)
    argv = [part.format(tmp=tmp_path, run=small_run) for part in command]
    config = ["--config", str(CONFIGS / "local_small.yaml")]
    assert main([*argv, *config, *small_sets(small_data, small_run)]) == 0
    assert states
    for state in states:
        moments = [t for p in state["optimizer"]["state"].values() for t in p.values() if t.dim() > 0]
        checkpoint = small_run / "checkpoints" / "step_1.pt"
        assert moments and all(mapped_from(t, checkpoint) for t in moments)


def test_a_mapped_restore_reads_a_file_torch_cannot_map_as_an_unmapped_one_does(tmp_path):
    """A legacy (non-zip) torch.save loads mapped or not; an empty file gets the same line either way, not
    torch's advice to save it again with another option."""
    source = nn.Linear(3, 2)
    legacy = tmp_path / "step_1.pt"
    torch.save({"model": source.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    target = nn.Linear(3, 2)
    restore_weights(target, legacy, mapped=True)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    empty = tmp_path / "step_2.pt"
    empty.write_bytes(b"")
    lines = []
    for mapped in (False, True):
        with pytest.raises(UserError) as error:
            restore_weights(target, empty, mapped=mapped)
        lines.append(str(error.value))
    assert lines[0] == lines[1] and "mmap" not in lines[1]


def test_a_checkpoint_replaced_while_it_is_mapped_gives_its_own_weights(tmp_path, monkeypatch):
    """torch.load(mmap=True) opens the file by name twice: an atomic save of the same name in between (a
    restarted run saving the step again) must not give one file's layout filled with the other's bytes."""
    path, other = tmp_path / "step_1.pt", tmp_path / "other.pt"
    torch.save({"model": {"weight": torch.full((1000,), 1.0), "bias": torch.full((3000,), 2.0)}}, path)
    torch.save({"model": {"bias": torch.full((4000,), 3.0), "weight": torch.full((1000,), 4.0)}}, other)
    replaced, size = [], os.path.getsize

    def replacing_the_file_first(name):  # torch asks the size between its two opens
        if not replaced:
            replaced.append(os.replace(other, path))
        return size(name)

    monkeypatch.setattr(os.path, "getsize", replacing_the_file_first)
    target = nn.Module()
    target.register_buffer("weight", torch.zeros(1000))
    target.register_buffer("bias", torch.zeros(3000))
    restore_weights(target, path, mapped=True)
    assert replaced and not other.exists()  # the name was replaced while the first file was open
    assert torch.equal(target.weight, torch.full((1000,), 1.0))
    assert torch.equal(target.bias, torch.full((3000,), 2.0))
