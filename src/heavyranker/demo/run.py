"""`make demo`: generate planted-truth data, train the small config, evaluate, and compare the model with
the best achievable (the planted truth), a logistic regression and LightGBM, task by task; write a report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, load_config, short_names
from ..data.dataset import RecapDataset
from ..data.sources.files import select_files
from ..data.synthetic import generate_for_config
from ..data.synthetic.truth import load_truth
from ..errors import UserError
from ..eval.metrics import auroc, rce
from ..eval.report import write_report
from ..model import Ranker
from ..run_folder import RunFolder
from ..runtime import init_runtime
from ..train.loop import Trainer
from .baselines import BASELINE_FEATURES, gradient_boosted_trees, logistic_regression, read_rows

# A third of the demo's training rows: enough for a linear model to converge, and for LightGBM's ten
# early-stopped models within minutes on two cores (the demo prints how long they took).
BASELINE_EXAMPLES = 200_000
# Written into a save_dir the demo creates: the demo clears a folder for a fresh run only if it holds this.
MARKER = ".heavyranker-demo"


def run_demo(config_path: str, overrides: list[str] | None = None) -> None:
    config = load_config(config_path, overrides)
    split = _plain_split(config)
    _check_baseline_features(config, split)
    save_dir = Path(config.training.save_dir)
    run = RunFolder(save_dir)
    fresh_run_folder(save_dir)  # before the data: a refused save_dir costs nothing

    print(f"== 1/4 generating planted-truth data for {config_path}")
    generate_for_config(config, seed=config.training.seed)  # logs each split it writes

    print(f"== 2/4 training {config.training.num_train_steps} steps in {save_dir} (a fresh run)")
    trainer = Trainer(config, runtime=init_runtime())
    trainer.run()

    print(f"== 3/4 scoring the {split!r} split: model, planted truth, logistic regression, LightGBM")
    probs, labels, weights = _predict(config, trainer.model, split)
    truth = load_truth(select_files(config.validation_data[split]))
    truth_probs, truth_labels = truth.probabilities(config.task_names), truth.labels(config.task_names)
    train_rows = read_rows(config, config.train_data, BASELINE_EXAMPLES)
    test_rows = read_rows(config, config.validation_data[split])
    logreg = logistic_regression(config.task_names, train_rows, test_rows)
    started = time.monotonic()
    lightgbm = gradient_boosted_trees(config.task_names, train_rows, test_rows, config.training.seed)
    seconds = time.monotonic() - started
    print(
        f"LightGBM: {len(config.task_names)} models fit on {len(train_rows)} training rows in {seconds:.0f} s"
    )

    rows = []
    for j, task in enumerate(config.task_names):
        y, w = labels[:, j], weights[:, j]
        scores = {
            "model": (auroc(y, probs[:, j], w), rce(y, probs[:, j], w)),
            "best": (
                auroc(truth_labels[:, j], truth_probs[:, j]),
                rce(truth_labels[:, j], truth_probs[:, j]),
            ),
            "logreg": (auroc(y, logreg[:, j]), rce(y, logreg[:, j])),
            "LightGBM": (auroc(y, lightgbm[:, j], w), rce(y, lightgbm[:, j], w)),
        }
        rows.append((task, y, scores))
    print(_table(rows))

    report = write_report(
        save_dir / "report.png",
        run.metrics,
        run.results(split),
        config.task_names,
        {"model": probs, "LightGBM": lightgbm, "logistic regression": logreg},
        labels,
        weights,
        notes=[f"RCE gap closed {logreg} vs logreg, {lgbm} vs LightGBM" for logreg, lgbm in map(_gaps, rows)],
    )
    print("== 4/4 outputs")
    print(f"report (training loss, AUROC and RCE over steps, reliability plots with RCE): {report}")
    print(f"checkpoints: {run.checkpoints}   metrics: {run.metrics}")
    print(f"evaluation results: {run.evaluations}   TensorBoard: tensorboard --logdir {run.tensorboard}")


def fresh_run_folder(save_dir: Path) -> None:
    """Makes save_dir an empty folder holding MARKER. It deletes a folder only if the demo created it (it
    holds MARKER): save_dir may be a real run's, or hold anything (`--set training.save_dir=$HOME`)."""
    try:
        ours = (save_dir / MARKER).is_file()
        empty = save_dir.is_dir() and not any(save_dir.iterdir())
        if save_dir.exists() and not (ours or empty):
            raise UserError(
                f"training.save_dir {save_dir}: exists and was not created by the demo, which clears its "
                f"folder for a fresh run; pick another save_dir (--set training.save_dir=PATH) or remove it"
            )
        if ours:
            shutil.rmtree(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / MARKER).write_text(
            "made by `heavyranker demo`, which deletes this folder when run again\n"
        )
    except OSError as e:
        raise UserError(f"training.save_dir {save_dir}: cannot make a fresh run folder: {e}") from None


def _plain_split(config: Config) -> str:
    """The first validation split without downsampling: its labels are the population's."""
    for name, data in config.validation_data.items():
        if all(t.pos_downsampling_rate == t.neg_downsampling_rate == 1.0 for t in data.tasks.values()):
            return name
    raise UserError(
        "validation_data: the demo compares with the planted truth on a split without downsampling; add one "
        "whose tasks all have pos_downsampling_rate and neg_downsampling_rate 1"
    )


def _check_baseline_features(config: Config, split: str) -> None:
    """Now rather than after training: the baselines read BASELINE_FEATURES of both splits."""
    read = {"train_data": config.train_data, f"validation_data.{split}": config.validation_data[split]}
    for where, data in read.items():
        schema = data.seg_dense_schema
        missing = [f for f in BASELINE_FEATURES if f not in {*schema.renamed_features, *schema.features}]
        if missing:
            raise UserError(
                f"{where}.seg_dense_schema: no feature {', '.join(missing)}, which the demo's baselines read "
                f"(name a schema feature so in renamed_features)"
            )


@torch.no_grad()
def _predict(config: Config, model: Ranker, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model.eval()
    data = config.validation_data[split]
    out: tuple[list, list, list] = ([], [], [])
    with RecapDataset(data, seed=config.training.seed) as dataset:
        for batch in dataset:
            columns = batch.columns(config.task_names)
            out[0].append(model(batch.features)["calibrated_probabilities"].numpy())
            out[1].append(batch.labels[:, columns].numpy())
            out[2].append(batch.weights[:, columns].numpy())
    return tuple(np.concatenate(parts) for parts in out)  # type: ignore[return-value]


def _table(rows: list[tuple[str, np.ndarray, dict[str, tuple[float, float]]]]) -> str:
    """rows: task, its labels, and AUROC and RCE of the model, the best (truth) and each baseline. The
    positives say how far a task's figures can be trusted: a few dozen make RCE move by points."""
    header = (
        f"{'task':<46} {'rate':>7} {'positives':>9} | {'model AUROC':>11} {'RCE':>6} | "
        f"{'best AUROC':>10} {'RCE':>6} | {'logreg AUROC':>12} {'RCE':>6} | "
        f"{'LightGBM AUROC':>14} {'RCE':>6} | {'RCE gap closed vs logreg':>24} {'vs LightGBM':>11}"
    )
    lines = [header, "-" * len(header)]
    short = short_names([row[0] for row in rows])
    for row in rows:
        task, labels, s = row
        (m_auc, m_rce), (b_auc, b_rce) = s["model"], s["best"]
        (l_auc, l_rce), (g_auc, g_rce) = s["logreg"], s["LightGBM"]
        vs_logreg, vs_lightgbm = _gaps(row)
        lines.append(
            f"{short[task]:<46} {labels.mean():>7.4f} {int(labels.sum()):>9} | "
            f"{m_auc:>11.4f} {m_rce:>6.2f} | {b_auc:>10.4f} {b_rce:>6.2f} | {l_auc:>12.4f} {l_rce:>6.2f} | "
            f"{g_auc:>14.4f} {g_rce:>6.2f} | "
            f"{vs_logreg:>24} {vs_lightgbm:>11}"
        )
    return "\n".join(lines)


def _gaps(row: tuple[str, np.ndarray, dict[str, tuple[float, float]]]) -> tuple[str, str]:
    """A table row's RCE gap closed against the logistic regression and against LightGBM."""
    scores = row[2]
    model, best = scores["model"][1], scores["best"][1]
    return _gap_closed(model, best, scores["logreg"][1]), _gap_closed(model, best, scores["LightGBM"][1])


def _gap_closed(model: float, best: float, baseline: float) -> str:
    """(model - baseline) / (best - baseline); n/a when the baseline is within half an RCE point of the best,
    where the ratio is noise over noise."""
    gap = best - baseline
    return f"{100 * (model - baseline) / gap:.0f}%" if gap > 0.5 else "n/a"
