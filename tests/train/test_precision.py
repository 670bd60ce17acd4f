"""training.precision: bf16 mixed precision keeps fp32 weights, optimizer state and checkpoints, so runs of
either precision resume each other; `train --amp` is its alias; a CPU where bf16 is slow is warned
about once."""

import pytest
import torch

from heavyranker.checkpoint import load_checkpoint
from heavyranker.cpu import CpuInfo
from heavyranker.train import loop
from heavyranker.train.loop import Trainer
from tests.conftest import small_config
from tests.train.test_loop import FAST, cli, losses, run

STEPS = "training.checkpoint_every_n=2"


def _all_fp32(state: dict) -> bool:
    tensors = [t for t in state["model"].values() if t.is_floating_point()]
    for per_param in state["optimizer"]["state"].values():
        tensors += [t for t in per_param.values() if torch.is_tensor(t) and t.is_floating_point() and t.dim()]
    return bool(tensors) and all(t.dtype == torch.float32 for t in tensors)


@pytest.mark.parametrize("first, then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_run_resumes_in_the_other_precision_from_fp32_checkpoints(small_data, tmp_path, first, then):
    run(small_data, tmp_path, "training.num_train_steps=2", STEPS, f"training.precision={first}")
    state = load_checkpoint(tmp_path / "checkpoints/step_2.pt")
    assert _all_fp32(state)
    resumed = run(small_data, tmp_path, "training.num_train_steps=4", STEPS, f"training.precision={then}")
    assert resumed.step == 4
    assert _all_fp32(load_checkpoint(tmp_path / "checkpoints/step_4.pt"))
    logged = losses(tmp_path)
    assert set(logged) == {1, 2, 3, 4} and all(
        torch.isfinite(torch.tensor(v["loss"])) for v in logged.values()
    )


def test_bf16_losses_are_close_to_fp32_and_not_equal(small_data, tmp_path):
    # The same data and initial weights: bf16 products (8 bits of mantissa) move the loss in its third digit.
    for precision in ("fp32", "bf16"):
        run(small_data, tmp_path / precision, "training.num_train_steps=3", f"training.precision={precision}")
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32[1]["loss"] == pytest.approx(bf16[1]["loss"], rel=2e-2)
    assert fp32[1]["loss"] != bf16[1]["loss"]


def test_amp_is_an_alias_of_training_precision_bf16(small_data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loop.Trainer, "run", lambda self: seen.append(self.config.training.precision))
    assert cli("train --amp", small_data, tmp_path) == 0
    assert cli("train", small_data, tmp_path) == 0
    assert seen == ["bf16", "fp32"]


@pytest.mark.parametrize(
    "vendor, flags, warned",
    [
        ("GenuineIntel", {"avx2", "avx512f"}, "whose flags have neither avx512_bf16 nor amx_bf16"),
        ("GenuineIntel", {"avx512f", "avx512_bf16"}, "an Intel CPU with avx512_bf16 but no amx_bf16"),
        ("AuthenticAMD", {"avx512f", "avx512_bf16"}, None),
        ("GenuineIntel", {"amx_tile", "amx_bf16"}, None),
    ],
)
def test_bf16_on_a_cpu_where_it_is_slow_warns_once_in_one_line(
    small_data, tmp_path, caplog, monkeypatch, vendor, flags, warned
):
    monkeypatch.setattr(loop, "cpu_info", lambda: CpuInfo("Fake CPU 9000", vendor, frozenset(flags)))
    with caplog.at_level("WARNING"):
        Trainer(small_config(small_data, tmp_path, *FAST, "training.precision=bf16"))
        Trainer(small_config(small_data, tmp_path, *FAST, "training.precision=fp32"))
    lines = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    if warned is None:
        assert lines == []
    else:
        assert len(lines) == 1 and "\n" not in lines[0]
        assert lines[0].startswith("training.precision: bf16 on Fake CPU 9000, ") and warned in lines[0]
