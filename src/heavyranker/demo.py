"""`make demo`: generate planted-truth data, train the small config, evaluate, and compare the model with
the best achievable (the planted truth) and a logistic regression, task by task; write a report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .config import Config, load_config, short_names
from .data.dataset import RecapDataset
from .data.files import select_files
from .data.synthetic import generate_for_config
from .data.truth import load_truth
from .errors import UserError
from .eval.metrics import auroc, rce
from .eval.report import write_report
from .model import Ranker
from .runtime import init_runtime
from .train.loop import Trainer

BASELINE_EXAMPLES = 200_000  # a third of the demo's training rows: enough for a linear model to converge
BASELINE_FEATURES = ("continuous", "binary")  # what the logistic regression reads besides embeddings
# Written into a save_dir the demo creates: the demo clears a folder for a fresh run only if it holds this.
MARKER = ".heavyranker-demo"


def run_demo(config_path: str, overrides: list[str] | None = None) -> None:
    config = load_config(config_path, overrides)
    split = _plain_split(config)
    _check_baseline_features(config, split)
    save_dir = Path(config.training.save_dir)
    fresh_run_folder(save_dir)  # before the data: a refused save_dir costs nothing

    print(f"== 1/4 generating planted-truth data for {config_path}")
    generate_for_config(config, seed=config.training.seed)  # logs each split it writes

    print(f"== 2/4 training {config.training.num_train_steps} steps in {save_dir} (a fresh run)")
    trainer = Trainer(config, runtime=init_runtime())
    trainer.run()

    print(f"== 3/4 scoring the {split!r} split: model, planted truth, logistic regression")
    data = config.validation_data[split]
    probs, labels, weights = _predict(config, trainer.model, split)
    truth = load_truth(select_files(data))
    truth_probs = truth.probabilities(config.task_names)
    truth_labels = truth.labels(config.task_names)
    baseline = _logistic_regression(config, split)

    rows = []
    for j, task in enumerate(config.task_names):
        model_auc, model_rce = (
            auroc(labels[:, j], probs[:, j], weights[:, j]),
            rce(labels[:, j], probs[:, j], weights[:, j]),
        )
        best_auc, best_rce = (
            auroc(truth_labels[:, j], truth_probs[:, j]),
            rce(truth_labels[:, j], truth_probs[:, j]),
        )
        lr_auc, lr_rce = auroc(labels[:, j], baseline[:, j]), rce(labels[:, j], baseline[:, j])
        rows.append((task, model_auc, model_rce, best_auc, best_rce, lr_auc, lr_rce, labels[:, j].mean()))
    print(_table(rows))

    report = write_report(
        save_dir / "report.png", save_dir / "metrics.jsonl", config.task_names, probs, labels, weights
    )
    print("== 4/4 outputs")
    print(f"report (loss curves, reliability plots): {report}")
    print(f"checkpoints: {save_dir / 'checkpoints'}   metrics: {save_dir / 'metrics.jsonl'}")
    print(
        f"evaluation results: {save_dir / 'eval'}   "
        f"TensorBoard: tensorboard --logdir {save_dir / 'tensorboard'}"
    )


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
    """Now rather than after training: the logistic regression reads BASELINE_FEATURES of both splits."""
    read = {"train_data": config.train_data, f"validation_data.{split}": config.validation_data[split]}
    for where, data in read.items():
        schema = data.seg_dense_schema
        missing = [f for f in BASELINE_FEATURES if f not in {*schema.renamed_features, *schema.features}]
        if missing:
            raise UserError(
                f"{where}.seg_dense_schema: no feature {', '.join(missing)}, which the demo's logistic "
                f"regression reads (name a schema feature so in renamed_features)"
            )


@torch.no_grad()
def _predict(config: Config, model: Ranker, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model.eval()
    data = config.validation_data[split]
    dataset = RecapDataset(data, seed=config.training.seed, training=False)
    out: tuple[list, list, list] = ([], [], [])
    try:
        for batch in dataset:
            columns = batch.columns(config.task_names)
            out[0].append(model(batch.features)["calibrated_probabilities"].numpy())
            out[1].append(batch.labels[:, columns].numpy())
            out[2].append(batch.weights[:, columns].numpy())
    finally:
        dataset.close()
    return tuple(np.concatenate(parts) for parts in out)  # type: ignore[return-value]


def _baseline_features(batch_features: dict[str, torch.Tensor]) -> np.ndarray:
    """What a linear model gets: sign*log1p(|x|) of the continuous features, binary flags, embeddings."""
    continuous = batch_features["continuous"].float()
    parts = [torch.sign(continuous) * torch.log1p(continuous.abs()), batch_features["binary"].float()]
    parts += [v.float() for k, v in batch_features.items() if k.endswith("embedding")]
    return torch.cat(parts, dim=1).numpy()


def _read(config: Config, data, limit: int) -> tuple[np.ndarray, np.ndarray]:
    dataset = RecapDataset(data, seed=config.training.seed, training=False)
    xs, ys, n = [], [], 0
    try:
        for batch in dataset:
            xs.append(_baseline_features(batch.features))
            ys.append(batch.labels[:, batch.columns(config.task_names)].numpy())
            n += len(batch)
            if n >= limit:
                break
    finally:
        dataset.close()
    return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


def _logistic_regression(config: Config, split: str) -> np.ndarray:
    """One logistic regression per task, fit on training examples, scored on the split."""
    x_train, y_train = _read(config, config.train_data, BASELINE_EXAMPLES)
    x_test, _ = _read(config, config.validation_data[split], 10**9)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    columns = []
    for j, task in enumerate(config.task_names):
        if len(np.unique(y_train[:, j])) < 2:  # sklearn refuses to fit a single class
            raise UserError(
                f"{task}: the first {len(y_train)} training examples hold a single label, so the demo's "
                f"logistic regression cannot be fit; give the demo a config whose tasks all have positives"
            )
        fit = LogisticRegression(max_iter=300).fit(x_train, y_train[:, j])
        columns.append(fit.predict_proba(x_test)[:, 1])
    return np.stack(columns, axis=1)


def _table(rows: list[tuple]) -> str:
    header = (
        f"{'task':<46} {'rate':>7} | {'model AUROC':>11} {'RCE':>6} | {'best AUROC':>10} {'RCE':>6} | "
        f"{'logreg AUROC':>12} {'RCE':>6} | {'RCE gap closed':>14}"
    )
    lines = [header, "-" * len(header)]
    short = short_names([row[0] for row in rows])
    for task, m_auc, m_rce, b_auc, b_rce, l_auc, l_rce, rate in rows:
        gap = b_rce - l_rce
        closed = f"{100 * (m_rce - l_rce) / gap:>13.0f}%" if gap > 0.5 else f"{'n/a':>14}"
        lines.append(
            f"{short[task]:<46} {rate:>7.4f} | {m_auc:>11.4f} {m_rce:>6.2f} | "
            f"{b_auc:>10.4f} {b_rce:>6.2f} | {l_auc:>12.4f} {l_rce:>6.2f} | {closed}"
        )
    return "\n".join(lines)
