import os
import subprocess
import sys

import numpy as np

from heavyranker.eval.report import reliability_curve, write_report


def test_reliability_curve_bins_by_prediction_quantile_with_weights():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    labels = np.array([0.0, 1.0, 0.0, 1.0])
    weights = np.array([1.0, 3.0, 1.0, 1.0])
    predicted, observed = reliability_curve(probs, labels, weights, bins=2)
    np.testing.assert_allclose(predicted, [(0.1 + 3 * 0.2) / 4, 0.35])
    np.testing.assert_allclose(observed, [3 / 4, 0.5])


def test_report_is_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss/a": 0.7, "loss/b": 0.6}\n{"step": 2, "loss/a": 0.5, "loss/b": 0.4}\n'
    )
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(100, 2))
    path = write_report(
        tmp_path / "r.png",
        tmp_path / "metrics.jsonl",
        ["a", "b"],
        probs,
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
write_report({str(tmp_path / "r.png")!r}, {str(tmp_path / "metrics.jsonl")!r}, ["a"],
             np.full((4, 1), 0.5), np.array([[0.0], [1.0], [0.0], [1.0]]), np.ones((4, 1)))
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "MPLBACKEND": "svg"})
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
