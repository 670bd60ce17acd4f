"""compare: the resampled metrics against metrics.py, the paired bootstrap's interval against a closed-form
truth and fresh samples, and the command on two small trained runs."""

import math
import re
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from heavyranker.cli import main
from heavyranker.data.columns import feature_specs
from heavyranker.errors import UserError
from heavyranker.eval import compare as compare_module
from heavyranker.eval.compare import (
    ResampledAuroc,
    Scores,
    paired_bootstrap,
    rce_resampled,
    resample_counts,
    score,
)
from heavyranker.eval.evaluator import evaluate_command
from heavyranker.eval.metrics import auroc, rce
from heavyranker.model import build_model
from heavyranker.release.rule import PromotionRule
from heavyranker.train.loop import Trainer
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config
from tests.eval.test_evaluator import running_out_of_memory
from tests.train.test_memory_fit import last_line

FAST = ("train_data.global_batch_size=64", "training.eval_log_every_n=1000", "training.train_log_every_n=10")


def test_resampled_metrics_equal_the_weighted_metrics_row_by_row():
    rng = np.random.default_rng(1)
    n = 300
    labels = (rng.random(n) < 0.2).astype(np.float64)
    scores = np.round(rng.random(n), 1) * 0.9 + 0.05  # many ties
    weights = np.stack([*resample_counts(n, 5, rng)])[0] * rng.uniform(0.5, 2.0, n)
    weights[0] = np.where(labels > 0, 0.0, weights[0])  # a resample without positives
    got_auroc, got_rce = ResampledAuroc(labels, scores)(weights), rce_resampled(labels, scores, weights)
    assert np.isnan(got_auroc[0]) and np.isnan(got_rce[0])
    np.testing.assert_allclose(got_auroc[1:], [auroc(labels, scores, w) for w in weights[1:]], rtol=1e-12)
    np.testing.assert_allclose(got_rce[1:], [rce(labels, scores, w) for w in weights[1:]], rtol=1e-10)


def test_resample_counts_draw_n_of_n_with_replacement_reproducibly():
    blocks = [*resample_counts(50, 70, np.random.default_rng(3))]
    assert [len(b) for b in blocks] == [64, 6]
    assert all((b.sum(axis=1) == 50).all() for b in blocks)
    again = [*resample_counts(50, 70, np.random.default_rng(3))]
    assert all(np.array_equal(x, y) for x, y in zip(blocks, again, strict=True))


def binormal_runs(rng: np.random.Generator, n: int) -> tuple[Scores, Scores]:
    """Two runs scoring the same examples: score = shift * label + unit normal noise, the runs' noise
    correlated 0.8 (as two models of the same data are). AUROC is Phi(shift / sqrt 2) for each."""
    labels = (rng.random(n) < 0.3).astype(np.float32)[:, None]
    noise = rng.normal(size=(n, 2))
    noise_b = 0.8 * noise[:, 0] + 0.6 * noise[:, 1]
    logits_a, logits_b = 1.0 * labels[:, 0] + noise[:, 0], 1.3 * labels[:, 0] + noise_b
    ones = np.ones_like(labels)
    runs = [
        Scores(None, 0, labels, (1 / (1 + np.exp(-x)))[:, None].astype(np.float32), ones)
        for x in (logits_a, logits_b)
    ]
    return runs[0], runs[1]


def test_the_paired_interval_covers_the_true_auroc_difference_95_percent_of_the_time():
    truth = 0.5 * (math.erf(1.3 / 2) - math.erf(1.0 / 2))  # Phi(1.3/sqrt 2) - Phi(1/sqrt 2)
    rng = np.random.default_rng(0)
    covered, widths, differences = [], [], []
    for _ in range(200):
        a, b = binormal_runs(rng, 600)
        [row] = paired_bootstrap(a, b, resamples=400, seed=int(rng.integers(2**31)))
        d = row["auroc"]
        covered.append(d.low <= truth <= d.high)
        widths.append(d.high - d.low)
        differences.append(d.b - d.a)
    # 200 intervals: 95% coverage gives 190 +- 3; an unpaired bootstrap (~3x wider here) would cover all.
    assert 180 <= sum(covered) <= 197
    # The interval's width against the spread of the difference over fresh samples.
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.std(differences), rel=0.15)


@pytest.fixture(scope="module")
def two_runs(small_data, tmp_path_factory):
    runs = []
    for steps, seed in ((3, 0), (6, 1)):
        save_dir = tmp_path_factory.mktemp("run")
        overrides = (f"training.num_train_steps={steps}", f"training.seed={seed}")
        Trainer(small_config(small_data, save_dir, *FAST, *overrides)).run()
        runs.append(save_dir)
    return runs


def compare(small_data, *args: str) -> int:
    sets = [f"train_data.inputs={small_data}/train/*.gz", *FAST]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    sets = [arg for value in sets for arg in ("--set", value)]
    return main(["compare", *args, "--config", str(CONFIGS / "local_small.yaml"), *sets])


def table_rows(out: str) -> dict[str, list[str]]:
    """task -> its cells: positives, auroc A, B, B - A, [low, high], (*), rce A, ... (positives left out)"""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task "))
    return {
        line.split()[0]: re.sub(r"\[(\S+), (\S+)\]", r"\1,\2", line).split()[2:]
        for line in lines[header + 1 :]
    }


def test_compare_prints_both_runs_metrics_as_evaluate_does_with_intervals_and_writes_html(
    small_data, two_runs, tmp_path, capsys, caplog
):
    run_a, run_b = two_runs
    html = tmp_path / "compare.html"
    capsys.readouterr()
    with caplog.at_level("INFO"):
        assert compare(small_data, str(run_a), str(run_b), "--split", "validation", "--html", str(html)) == 0
    # Where the page went, for the user who asked for it.
    assert f"wrote the table and each task's reliability plot to {html}" in caplog.messages
    rows = table_rows(capsys.readouterr().out)
    config = small_config(small_data, run_a, *FAST)
    assert set(rows) == {task.removeprefix("recap.engagement.") for task in config.task_names}
    for run, column in ((run_a, 0), (run_b, 1)):
        evaluated = evaluate_command(config, checkpoint=str(run), watch=False, split="validation")[
            "validation"
        ]
        for task, metrics in evaluated.items():
            cells = rows[task.removeprefix("recap.engagement.")]
            rce_at = 5 if cells[4] == "*" else 4  # after the auroc cells, with or without the mark
            assert float(cells[column]) == pytest.approx(metrics["auroc"], rel=1e-3, nan_ok=True)
            assert float(cells[rce_at + column]) == pytest.approx(metrics["rce"], rel=1e-3, nan_ok=True)
    page = html.read_text()
    assert page.count("data:image/png;base64,") == len(rows)


def test_a_run_compared_with_itself_differs_by_exactly_zero(small_data, two_runs, capsys):
    run_a, _ = two_runs
    assert compare(small_data, str(run_a), str(run_a), "--resamples", "100") == 0
    for cells in table_rows(capsys.readouterr().out).values():
        # A task without positives in the split (the rarest) has no metrics, so no difference either.
        zero = ["nan", "nan,nan"] if cells[0] == "nan" else ["0", "0,0"]
        assert cells[2:4] == zero and cells[6:8] == zero and "*" not in cells


@pytest.mark.parametrize("resamples", ["0", "-5", "99"])
def test_too_few_resamples_is_one_line_before_any_scoring(small_data, tmp_path, capsys, resamples):
    runs = (str(tmp_path / "a"), str(tmp_path / "b"))  # never read: the count is checked first
    assert compare(small_data, *runs, "--resamples", resamples) == 2
    out, err = capsys.readouterr()
    expected = f"compare: resamples is {resamples}; a 95% interval needs at least 100 (default 1000)"
    assert err == f"error: {expected}\n"
    assert out == ""


def test_too_many_resamples_is_one_line_before_any_scoring(small_data, tmp_path, capsys):
    # 10**9 resamples would rescore the split 10**9 times and keep 8 GB of differences per task and metric.
    runs = (str(tmp_path / "a"), str(tmp_path / "b"))  # never read: the count is checked first
    assert compare(small_data, *runs, "--resamples", str(10**9)) == 2
    assert (
        capsys.readouterr().err == "error: compare: resamples is 1000000000; at most 100,000 (default 1000)\n"
    )


def test_promote_refuses_too_many_resamples_before_scoring():
    rule = PromotionRule(resamples=100_001)
    with pytest.raises(UserError, match="promote: resamples is 100001; at most 100,000"):
        rule.check([])


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_an_html_path_that_cannot_be_written_is_one_line_before_scoring(small_data, tmp_path, capsys, where):
    (tmp_path / "a-file").write_text("kept")
    html = {"folder": tmp_path, "under-a-file": tmp_path / "a-file" / "compare.html"}[where]
    runs = (str(tmp_path / "a"), str(tmp_path / "b"))  # never read: the path is checked first
    assert compare(small_data, *runs, "--html", str(html)) == 2
    expected = {
        "folder": f"error: compare: --html {tmp_path} is a folder; give the name of a file to write\n",
        "under-a-file": f"error: compare: --html {html}: cannot create its folder: File exists\n",
    }[where]
    assert capsys.readouterr().err == expected
    assert (tmp_path / "a-file").read_text() == "kept"


def test_the_html_page_is_written_atomically_over_the_old_one(small_data, two_runs, tmp_path, capsys):
    run_a, _ = two_runs
    html = tmp_path / "new" / "compare.html"  # its folder is created
    assert compare(small_data, str(run_a), str(run_a), "--resamples", "100", "--html", str(html)) == 0
    assert html.read_text().endswith("</html>\n")
    # A second name for the old page: a write in place would change it, a new file renamed over the name not.
    old = tmp_path / "old.html"
    old.hardlink_to(html)
    html.write_text("the old page")
    assert compare(small_data, str(run_a), str(run_a), "--resamples", "100", "--html", str(html)) == 0
    assert old.read_text() == "the old page" and html.read_text().endswith("</html>\n")
    assert sorted(p.name for p in html.parent.iterdir()) == ["compare.html"]  # no temporary left


def test_compare_names_a_missing_step(small_data, two_runs, capsys):
    run_a, run_b = two_runs
    assert compare(small_data, str(run_a), str(run_b), "--step", "5") == 2
    assert (
        capsys.readouterr().err
        == f"error: {run_a}: no checkpoint of step 5 ({run_a}/checkpoints/step_5.pt)\n"
    )


ONE_EMBEDDING = (
    "model.small_embeddings={tables: [{name: d0, index: 0, num_embeddings: 16, embedding_dim: 2}]}"
)


def test_runs_of_different_models_compare_with_run_b_config(small_data, two_runs, tmp_path, capsys):
    run_a, _ = two_runs
    run_c = tmp_path / "run_c"
    config_c = small_config(small_data, run_c, *FAST, "training.num_train_steps=3", ONE_EMBEDDING)
    Trainer(config_c).run()
    capsys.readouterr()
    assert compare(small_data, str(run_a), str(run_c), "--split", "validation", "--set-b", ONE_EMBEDDING) == 0
    rows = table_rows(capsys.readouterr().out)
    evaluated = evaluate_command(config_c, checkpoint=str(run_c), watch=False, split="validation")
    for task, metrics in evaluated["validation"].items():
        assert float(rows[task.removeprefix("recap.engagement.")][1]) == pytest.approx(
            metrics["auroc"], rel=1e-3, nan_ok=True
        )
    # Without B's config, B's checkpoint does not fit A's model: one line naming the parameters and the way
    # out, before A is scored (nothing printed).
    capsys.readouterr()
    assert compare(small_data, str(run_a), str(run_c)) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {run_c}/checkpoints/step_3.pt does not fit this model: unexpected small")
    assert err.endswith("(a run of another model: give its config with --config-b or --set-b)\n")
    assert err.count("\n") == 1 and out == ""


def test_compare_refuses_a_run_b_model_that_cannot_score_the_split(small_data, two_runs, capsys):
    run_a, run_b = two_runs
    one_tower = (
        "model.tasks={recap.engagement.is_favorited: {mlp_config: {layer_sizes: [1]}}}",
        "optimizer.multi_task_learning_rates.tower_learning_rates="
        "{recap.engagement.is_favorited: {constant: 0.1}}",
    )
    assert compare(small_data, str(run_a), str(run_b), *(a for s in one_tower for a in ("--set-b", s))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: compare: the model of {run_b} has no tower for recap.engagement.is_good")
    assert err.count("\n") == 1
    assert compare(small_data, str(run_a), str(run_b), "--config-b", str(CONFIGS / "local_prod.yaml")) == 2
    err = capsys.readouterr().err
    assert re.match(
        rf"error: compare: the model of {run_b} reads features the split does not have .*continuous", err
    )
    assert err.count("\n") == 1


def test_an_out_of_memory_while_scoring_is_one_line(small_data, two_runs, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "build_model", running_out_of_memory(compare_module.build_model))
    assert compare(small_data, *map(str, two_runs), "--split", "validation") == 2
    assert last_line(capsys) == (
        "error: out of memory scoring the runs on validation; "
        "lower validation_data.validation.global_batch_size"
    )


class DataArrivingWhileScoring(torch.nn.Module):
    """A model that, as it scores its first batch, lands a newer hour of data (`arrive`)."""

    def __init__(self, model, arrive):
        super().__init__()
        self.model, self.arrive, self.task_names = model, arrive, model.task_names

    def forward(self, features):
        self.arrive()
        return self.model(features)


def test_both_models_score_the_same_examples_though_data_arrives_while_scoring(small_data, tmp_path):
    """One read of the split, each batch scored by both: a second read would find the newer hour (an end at
    latest, or a folder still being written), other examples, and no paired comparison."""
    files = sorted((small_data / "validation").glob("*.gz"))
    (tmp_path / "2023/01/01/00").mkdir(parents=True)
    shutil.copy(files[0], tmp_path / "2023/01/01/00")
    newer = tmp_path / "2023/01/01/01"
    arrive = partial(shutil.copytree, small_data / "validation", newer, dirs_exist_ok=True)
    dated = f"{{data_root: {tmp_path}, end_datetime: latest, hours: 1}}"
    config = small_config(
        small_data, tmp_path / "run", "validation_data.validation.inputs=null",
        f"validation_data.validation.explicit_datetime_inputs={dated}",
    )  # fmt: skip
    data = config.validation_data["validation"]
    specs = feature_specs(config.train_data)
    a, b = (build_model(config.model, specs) for _ in range(2))
    joint = score(config, [(DataArrivingWhileScoring(a, arrive), Path("a"), 0), (b, Path("b"), 0)], data)
    assert np.array_equal(joint[0].labels, joint[1].labels) and len(joint[0].labels) > 0
    paired_bootstrap(*joint, resamples=100, seed=0)  # pairs them
    # Read again, once per model, the two see other examples: the hour that arrived.
    shutil.rmtree(newer)
    (first,) = score(config, [(DataArrivingWhileScoring(a, arrive), Path("a"), 0)], data)
    (second,) = score(config, [(b, Path("b"), 0)], data)
    assert len(first.labels) != len(second.labels)
