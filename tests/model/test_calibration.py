import pytest
import torch

from heavyranker.config import load_config
from heavyranker.model.calibration import calibrate, downsampling_ratios

# is_replied's negatives kept at 1%, its positives at 50%: r = 0.02
REPLIED_RATES = (
    "train_data.tasks.recap.engagement.is_replied={pos_downsampling_rate: 0.5, neg_downsampling_rate: 0.01}"
)


def test_calibration_formula_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.2]])
    r = torch.tensor([0.01, 1.0, 0.25])
    # 0.5 * 0.01 / (0.5 + 0.005) ; identity at r = 1 ; 0.05 / (0.8 + 0.05)
    got = calibrate(p, r)[0].tolist()
    assert got == pytest.approx([0.005 / 0.505, 0.5, 0.05 / 0.85], rel=1e-6)


def test_calibration_undoes_negative_downsampling():
    # 1000 negatives and 10 positives, negatives kept at 1%: the model sees 10 and 10, p = 0.5
    r = torch.tensor([0.01])
    assert calibrate(torch.tensor([[0.5]]), r).item() == pytest.approx(10 / 1010, rel=1e-6)


def test_ratio_is_neg_over_pos_rate_per_task(small_config_path):
    config = load_config(small_config_path, [REPLIED_RATES])
    ratios = downsampling_ratios(
        config.train_data.tasks, ["recap.engagement.is_favorited", "recap.engagement.is_replied"]
    )
    assert ratios.tolist() == pytest.approx([1.0, 0.02])
