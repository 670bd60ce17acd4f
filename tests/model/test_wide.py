"""The wide path of a tower (model.tasks.<task>.wide): a linear logit on the model's input added to the
tower's, learnt with the tower, checked against a logistic regression fit by sklearn on the same inputs."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from heavyranker.config import load_config
from heavyranker.config.loader import ConfigError
from heavyranker.model import module_name
from tests.model.test_ranker import SMALL_INPUT, TASKS, _build, _features

RARE = TASKS[6]  # is_replied_reply_engaged_by_author
WIDE = [f"model.tasks.{RARE}.wide=true"]


def test_with_its_deep_part_zeroed_a_wide_tower_is_a_logistic_regression_on_the_inputs(small_config_path):
    config = load_config(small_config_path, WIDE)
    model = _build(config).eval()
    features = _features(config, batch=400, seed=1)
    with torch.no_grad():
        x = model.inputs(features).numpy().astype(np.float64)
    # Labels from a planted linear rule with noise, so that the fit has a finite optimum.
    rng = np.random.default_rng(0)
    labels = (x @ rng.normal(size=x.shape[1]) * 0.3 + rng.logistic(size=len(x)) > 1.0).astype(int)
    fit = LogisticRegression(C=1.0, max_iter=2000).fit(x, labels)
    tower = model.towers[module_name(RARE)]
    last = [m for m in tower.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.zero_()  # the deep part says nothing ...
        last.bias.fill_(float(fit.intercept_[0]))  # ... but the intercept, which the tower's last bias holds
        model.wide[module_name(RARE)].weight.copy_(torch.from_numpy(fit.coef_).float())
        logits = model(features)["logits"][:, TASKS.index(RARE)].numpy()
    np.testing.assert_allclose(logits, fit.decision_function(x), rtol=1e-4, atol=1e-4)


def test_a_wide_path_starts_at_zero_reads_the_whole_input_and_learns_with_its_tower(small_config_path):
    plain = _build(load_config(small_config_path))
    config = load_config(small_config_path, WIDE)
    model = _build(config)
    assert list(model.wide) == [module_name(RARE)]
    wide = model.wide[module_name(RARE)]
    assert wide.in_features == SMALL_INPUT and wide.out_features == 1 and wide.bias is None
    # zero weights and no random draws: the model starts as the one without a wide path, same seed
    features = _features(config)
    torch.testing.assert_close(model.eval()(features)["logits"], plain.eval()(features)["logits"])
    towers = model.tower_parameters()
    assert any(p is wide.weight for p in towers[RARE])
    assert not any(p is wide.weight for task, params in towers.items() if task != RARE for p in params)


def test_a_wide_path_adds_its_logit_to_the_towers_under_share_all(small_config_path):
    config = load_config(small_config_path, WIDE)
    model = _build(config).eval()
    with torch.no_grad():
        model.wide[module_name(RARE)].weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
        features = _features(config)
        x = model.inputs(features)
        deep = model.towers[module_name(RARE)](model.backbone(x))[:, 0]
        expected = deep + x @ model.wide[module_name(RARE)].weight[0]
        torch.testing.assert_close(model(features)["logits"][:, TASKS.index(RARE)], expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbone.wide=true"], r"model: backbone.wide: only a task's tower has a wide path"),
        ([f"model.tasks.{RARE}.wide=3"], rf"model.tasks.{RARE}.wide"),
    ],
)
def test_wide_config_errors_are_one_line(small_config_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(small_config_path, overrides)
    assert "\n" not in str(error.value)
