import json
import os
import subprocess
import sys

import numpy as np

from heavyranker.eval.report import build_report, reliability_curve, write_report


def test_reliability_curve_bins_by_prediction_quantile_with_weights():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    labels = np.array([0.0, 1.0, 0.0, 1.0])
    weights = np.array([1.0, 3.0, 1.0, 1.0])
    predicted, observed = reliability_curve(probs, labels, weights, bins=2)
    np.testing.assert_allclose(predicted, [(0.1 + 3 * 0.2) / 4, 0.35])
    np.testing.assert_allclose(observed, [3 / 4, 0.5])


def run_folder(tmp_path):
    """A run's training log (tasks a and b) and evaluations at steps 10 and 20 (b has no positives at 10)."""
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss/a": 7.0, "loss/b": 0.6}\n{"step": 2, "loss/a": 0.5, "loss/b": 0.4}\n'
        '{"step": 3, "loss/a": 0.4, "loss/b": 0.3}\n'
    )
    (tmp_path / "eval" / "validation").mkdir(parents=True)
    for step, b_auroc in ((20, 0.7), (10, None)):
        metrics = {"a": {"auroc": step / 100, "rce": step / 10}, "b": {"auroc": b_auroc, "rce": 1.0}}
        (tmp_path / "eval" / "validation" / f"step_{step}.json").write_text(json.dumps({"metrics": metrics}))
    return tmp_path


def test_the_report_plots_loss_on_a_log_scale_and_metrics_per_evaluated_step(tmp_path):
    run = run_folder(tmp_path)
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(100, 2))
    labels = (rng.uniform(size=(100, 2)) < probs).astype(float)
    predictions = {"model": probs, "LightGBM": np.clip(probs * 1.1, 0, 1)}
    fig = build_report(
        run / "metrics.jsonl",
        run / "eval" / "validation",
        ["a", "b"],
        predictions,
        labels,
        np.ones((100, 2)),
        notes=["note a", "note b"],
    )
    axes = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    assert sorted(axes) == sorted(
        f"{t}: {plot}"
        for t in "ab"
        for plot in ("training loss", "AUROC (validation)", "RCE (validation)", f"reliability\nnote {t}")
    )
    loss = axes["a: training loss"]
    assert loss.get_yscale() == "log"
    np.testing.assert_array_equal(loss.lines[0].get_xydata(), [[1, 7.0], [2, 0.5], [3, 0.4]])
    np.testing.assert_array_equal(axes["a: AUROC (validation)"].lines[0].get_xydata(), [[10, 0.1], [20, 0.2]])
    np.testing.assert_array_equal(axes["a: RCE (validation)"].lines[0].get_xydata(), [[10, 1.0], [20, 2.0]])
    b_auroc = axes["b: AUROC (validation)"].lines[0].get_xydata()
    np.testing.assert_array_equal(b_auroc, [[10, np.nan], [20, 0.7]])  # null: no point, not a failure
    reliability = axes["b: reliability\nnote b"]

    def rce(p: np.ndarray, y: np.ndarray) -> float:  # 100 (1 - CE / CE of the mean label), by hand
        def ce(q: np.ndarray) -> float:
            return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

        return 100 * (1 - ce(p) / ce(np.full_like(p, y.mean())))

    p_b, lgbm_b = probs[:, 1], np.clip(probs[:, 1] * 1.1, 1e-7, 1 - 1e-7)
    assert [line.get_label() for line in reliability.lines[1:]] == [
        f"model (RCE {rce(p_b, labels[:, 1]):.2f})",
        f"LightGBM (RCE {rce(lgbm_b, labels[:, 1]):.2f})",
    ]
    predicted, observed = reliability_curve(probs[:, 1], labels[:, 1], np.ones(100))
    np.testing.assert_array_equal(reliability.lines[1].get_xydata(), np.stack([predicted, observed], axis=1))


def test_report_is_a_png(tmp_path):
    run = run_folder(tmp_path)
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(100, 2))
    path = write_report(
        tmp_path / "r.png",
        run / "metrics.jsonl",
        run / "eval" / "validation",
        ["a", "b"],
        {"model": probs},
        (rng.uniform(size=(100, 2)) < probs).astype(float),
        np.ones((100, 2)),
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_writing_a_report_leaves_matplotlib_global_state_alone(tmp_path):
    """The backend the program chose stays chosen, and no pyplot figure is kept, at import or at use (in a
    fresh process: pytest's may have imported pyplot already)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/a": 0.7}\n')
    script = f"""
import sys
import matplotlib
import numpy as np
from heavyranker.eval.report import write_report
write_report({str(tmp_path / "r.png")!r}, {str(tmp_path / "metrics.jsonl")!r}, {str(tmp_path / "eval")!r},
             ["a"], {{"model": np.full((4, 1), 0.5)}}, np.array([[0.0], [1.0], [0.0], [1.0]]),
             np.ones((4, 1)))
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "MPLBACKEND": "svg"})
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
