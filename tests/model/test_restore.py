"""restore_weights: the one way a command puts a checkpoint's weights into the model it built."""

import pytest
import torch
from torch import nn

from heavyranker.errors import UserError
from heavyranker.model import restore_weights


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
