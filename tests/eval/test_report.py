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
