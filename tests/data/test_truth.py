import os

import numpy as np

from heavyranker.data.synthetic.truth import IDS, load_truth, truth_path, write_truth


def test_a_sidecar_is_written_under_its_name_alone_and_reads_back(tmp_path):
    """np.savez adds ".npz" to a name without it: neither the sidecar nor a temporary may get one."""
    path = truth_path(str(tmp_path / "part-00000.gz"))
    probabilities = np.array([[0.25, 0.5], [0.75, 0.125]])
    labels = np.array([[0, 1], [1, 0]])
    ids = {name: np.array([i, 10 + i]) for i, name in enumerate(IDS)}
    write_truth(path, ["a", "b"], probabilities, labels, ids)
    assert os.listdir(tmp_path) == ["part-00000.truth.npz"]
    truth = load_truth([str(tmp_path / "part-00000.gz")])
    np.testing.assert_array_equal(truth.probabilities(["b", "a"]), probabilities[:, ::-1])
    np.testing.assert_array_equal(truth.labels(["a", "b"]), labels)
    assert {name: list(values) for name, values in truth.ids.items()} == {
        "user_id": [0, 10],
        "tweet_id": [1, 11],
        "author_id": [2, 12],
    }
