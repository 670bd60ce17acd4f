"""`heavyranker tune --report`: a study's trials, the parameters' importances, and a plot of both."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..atomic import atomic_write
from ..errors import UserError
from .study import SETTINGS, STUDY_NAME, opening_storage, storage_url


def report_study(out: Path, storage: str | None) -> Path | None:
    """Prints the trials and the importances, writes DIR/report.png; returns the plot (None without a
    complete trial to plot)."""
    url = storage_url(out, storage)
    if storage is None and not (out / "study.db").is_file():
        raise UserError(f"{out}: no study.db here; give the --out of a tune (or its --storage)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with opening_storage(url):
            study = optuna.load_study(study_name=STUDY_NAME, storage=url)
    except KeyError:
        raise UserError(f"{out}: the storage holds no tune study") from None
    trials = study.get_trials(deepcopy=False)
    print(format_trials(trials))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        print(format_best(study.best_trial))
    if len(complete) < 2:
        print(f"importances: need 2 complete trials, the study has {len(complete)}")
    else:
        importances = optuna.importance.get_param_importances(study)
        print("importances (fANOVA, share of the objective's variance):")
        for name, share in importances.items():
            print(f"  {share:6.3f}  {name}")
    if not complete:
        return None
    return write_plot(study, out / "report.png", len(complete) >= 2)


def format_trials(trials: list[FrozenTrial]) -> str:
    lines = [f"{'trial':>5} {'state':<8} {'value':>10} {'steps':>6} {'seconds':>8}  params"]
    for t in trials:
        value = f"{t.value:.5g}" if t.value is not None else "-"
        last = max(t.intermediate_values, default=None)
        steps = "-" if last is None else str(last)
        took = f"{t.duration.total_seconds():.0f}" if t.duration is not None else "-"
        lines.append(
            f"{t.number:>5} {t.state.name:<8} {value:>10} {steps:>6} {took:>8}  {json.dumps(t.params)}"
        )
    return "\n".join(lines)


def format_best(best: FrozenTrial) -> str:
    """The best trial, its parameters as Optuna holds them, and the settings they give, as `--set` arguments
    (a mapping choice one per field it sets; a study tuned before they were recorded has none)."""
    settings = best.user_attrs.get(SETTINGS, [])
    lines = [f"best: trial {best.number}, {best.value:.6g}, {json.dumps(best.params)}"]
    if settings:
        lines.append("  its settings, as train takes them on top of tune's --config and --set:")
    return "\n".join([*lines, *(f"    {override}" for override in settings)])


def write_plot(study: optuna.Study, path: Path, importances: bool) -> Path:
    """Optuna's matplotlib plots: the optimization history at `path` and, with 2 complete trials or more,
    the importances beside it (importances.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    plots = {path: plot_optimization_history}
    if importances:
        plots[path.with_name("importances.png")] = plot_param_importances
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for where, plot in plots.items():
            figure = plot(study).figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            with atomic_write(where, "wb") as f:
                figure.savefig(f, format="png", dpi=80)
            plt.close(figure)
    return path
