"""`heavyranker <command>`: one entry point for every job. This module builds the parser (serve's flags from
config.serving.ServeOptions) and turns errors into one line; handlers.py holds the thin handlers."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import sys
import typing
from collections.abc import Callable

from . import handlers
from .config import ConfigError
from .config.export import PRECISIONS, TABLE_PRECISIONS
from .config.serving import SERVING, ServeOptions
from .errors import SettingError, UserError
from .memory import is_out_of_memory, out_of_memory_words
from .serve.repository import DEFAULT_KEEP
from .urls import redact

EXIT_USER_ERROR = 2
OUT_OF_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # a full disk or quota, a read-only disk: one line
# A path a person gave that cannot be used as given: a file where a folder is needed (--out under a file, or a
# file at a save_dir), a folder where a file is, no permission. One line naming the path, what the system said
# and, where it helps, what to do. Any other OSError is a defect and keeps its traceback.
IN_THE_WAY = {
    errno.ENOTDIR: "a file stands where one of its folders should be",
    errno.EEXIST: "a file stands where a folder is needed",
    errno.EISDIR: "give the name of a file, not of a folder",
    errno.EACCES: "",
    errno.EPERM: "",
    errno.ENAMETOOLONG: "",
    errno.ELOOP: "",
}


METAVARS = {int: "N", float: "NUMBER", str: "TEXT"}


def finite_number(text: str) -> float:
    """A flag's number: float() also takes nan and inf, which pass every `< 0` check (promote --tolerance nan
    published any candidate, --id-effects nan was a traceback from the generator's solver)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of config.serving.ServeOptions: `max_queue` is --max-queue, its value held as
    `serving.max_queue` (the setting's name, which errors give). A flag not given leaves the option to the
    model folder's `serving:` section, then to the default."""
    for name, field in ServeOptions.model_fields.items():
        default = f"{field.default:g}" if isinstance(field.default, float) else field.default
        described = f"{field.description} Default: {SERVING}.{name} of the model's config, else {default}."
        # An optional option (`str | None`) takes the flag's value as its type.
        kind = next(
            t for t in typing.get_args(field.annotation) or (field.annotation,) if t is not type(None)
        )
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"{SERVING}.{name}",
            type=kind,
            metavar=METAVARS[kind],
            help=described.replace("%", "%%"),
        )


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """--precision and --table-precision, for the commands that export."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="of the dense layers' products: fp32 (the default), bf16 (pt2 only) or int8 (onnx only)",
    )
    parser.add_argument(
        "--table-precision",
        choices=TABLE_PRECISIONS,
        default="fp32",
        help="of the id embedding tables' rows: fp32 (the default) or int8 (row-wise, a quarter of the "
        "bytes; either format; docs/id-embeddings.md)",
    )


def add_repository_flags(parser: argparse.ArgumentParser) -> None:
    """--model-name and --keep-versions, for the commands that add a version to a model repository."""
    default_name = ServeOptions.model_fields["model_name"].default
    parser.add_argument(
        "--model-name",
        default=default_name,
        help=f"the model's folder in the repository (default {default_name})",
    )
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=DEFAULT_KEEP,
        metavar="K",
        help=f"keep the newest K versions, and those a server serves (default {DEFAULT_KEEP})",
    )


def _with_config(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("config", help="the YAML config")
    else:
        parser.add_argument("--config", "-c", required=True, help="the YAML config")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="DOTTED.PATH=VALUE",
        help="override a config value (parsed as YAML); repeatable; keys may contain dots",
    )


def flag_of(parser: argparse.ArgumentParser, setting: str) -> str | None:
    """The command's flag that gives `setting` (a library names the setting, the user typed the flag)."""
    for action in parser._actions:
        if action.dest == setting and action.option_strings:
            return action.option_strings[0]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heavyranker", description="Train, evaluate and serve a heavy ranker."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction, name: str, help: str, handler: Callable
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    config = commands.add_parser("config", help="config tools").add_subparsers(dest="sub", required=True)
    _with_config(
        command(
            config,
            "validate",
            "print the resolved config, or what is wrong with it",
            handlers.run_config_validate,
        ),
        positional=True,
    )

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="sub", required=True)
    p = command(
        data,
        "generate",
        "write synthetic data with a planted truth for the config's splits",
        handlers.run_data_generate,
    )
    _with_config(p)
    p.add_argument("--out", help="folder (default: where the config's globs point)")
    p.add_argument(
        "--examples",
        type=int,
        help="rows of the train split (default: by schema width, at most 200000); "
        "each validation split gets a tenth",
    )
    p.add_argument("--files", type=int, help="files per split (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--world",
        choices=("demo", "holdout"),
        default="demo",
        help="whose planted truth: the demo's, or the second benchmark's (holdout; see docs/tuning.md)",
    )
    p.add_argument(
        "--id-effects",
        type=finite_number,
        default=0.0,
        help="plant a per-user and per-author effect of this scale (logits) on Zipf-frequent raw int64 ids, "
        "for id embedding tables to learn (docs/id-embeddings.md; default 0: off)",
    )
    p.add_argument(
        "--rows-per-user",
        type=finite_number,
        default=8.0,
        help="train rows per user on average, which sets how many users there are (default 8)",
    )
    p.add_argument(
        "--rows-per-author",
        type=finite_number,
        help="train rows per author on average (default: authors a quarter as many as users)",
    )
    p = command(
        data, "dump", "write the arrays of some batches to an .npz for inspection", handlers.run_data_dump
    )
    _with_config(p)
    p.add_argument("--split", default="train", help="train, or a validation split name")
    p.add_argument("--inputs", help="a glob that replaces the split's inputs")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--out", required=True, help="FILE.npz")
    p = command(
        data,
        "stats",
        "per-feature statistics for z_score_log (and with --bins, piecewise_linear) featurization",
        handlers.run_data_stats,
    )
    _with_config(p)
    p.add_argument("--out", required=True, help="FILE.json")
    p.add_argument("--batches", type=int, default=100, help="training batches to read")
    p.add_argument("--bins", type=int, help="also each feature's quantile bin edges, for this many bins")
    p = command(
        data, "cache", "the decoded cache of the config's splits: size, files cached", handlers.run_data_cache
    )
    _with_config(p)
    p.add_argument("--clear", action="store_true", help="remove everything in the cache folders")
    p = command(
        data,
        "convert",
        "rewrite a split's files as Parquet or TFRecord, one file per file",
        handlers.run_data_convert,
    )
    _with_config(p)
    p.add_argument("--split", default="train", help="train, or a validation split name")
    p.add_argument("--inputs", help="a glob that replaces the split's inputs")
    p.add_argument("--to", required=True, choices=["parquet", "tfrecord"], help="the format to write")
    p.add_argument("--out", required=True, help="folder; each file keeps its path below the inputs' folder")

    model = commands.add_parser("model", help="model tools").add_subparsers(dest="sub", required=True)
    _with_config(
        command(model, "summary", "each module with its parameter count", handlers.run_model_summary)
    )

    p = command(commands, "train", "train the model (resumes from save_dir)", handlers.run_train)
    _with_config(p)
    p.add_argument("--amp", action="store_true", help="bf16 mixed precision (sets training.precision: bf16)")
    p.add_argument("--nproc", type=int, default=0, help="launch this many processes with torchrun")
    p.add_argument("--follow", action="store_true", help="train on new data as it arrives (training.follow)")

    p = command(
        commands, "evaluate", "metrics of a checkpoint on each validation split", handlers.run_evaluate
    )
    _with_config(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a checkpoint (default: the newest in save_dir)")
    which.add_argument("--watch", action="store_true", help="evaluate each new checkpoint as it appears")
    p.add_argument("--split", help="only this validation split")

    p = command(
        commands,
        "compare",
        "two runs' AUROC and RCE per task on a validation split, with paired bootstrap intervals",
        handlers.run_compare,
    )
    p.add_argument(
        "run_a",
        metavar="RUN_A",
        help="a run folder (training.save_dir of a run), or an exported model folder (scored as its program)",
    )
    p.add_argument("run_b", metavar="RUN_B", help="another run or exported folder; the table shows B - A")
    _with_config(p)
    p.add_argument("--split", help="a validation split (default: the config's first)")
    p.add_argument(
        "--step",
        type=int,
        help="this step's checkpoint of both runs (default: the marked best, else newest); an exported "
        "folder holds one",
    )
    p.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples: 100 to 100,000 (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap (default 0)")
    p.add_argument("--html", metavar="FILE", help="also write the table and reliability plots as HTML")
    p.add_argument("--config-b", help="the YAML of RUN_B's model where it differs (data: from --config)")
    p.add_argument(
        "--set-b",
        action="append",
        default=[],
        metavar="DOTTED.PATH=VALUE",
        help="override a value of RUN_B's config only (after --config-b, else after --config and --set)",
    )

    p = command(commands, "export", "write a self-contained scoring artifact", handlers.run_export)
    _with_config(p)
    p.add_argument(
        "--checkpoint",
        help="a checkpoint (default: the best in save_dir with training.keep_best, else the newest)",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder")
    where.add_argument(
        "--repository",
        metavar="REPO",
        help="a model repository (a folder or s3://bucket/prefix): add the next version of --model-name",
    )
    add_repository_flags(p)
    p.add_argument(
        "--format",
        choices=("onnx", "pt2"),
        default="onnx",
        help="model.onnx and config.pbtxt (onnxruntime, Triton; the default) or model.pt2 (torch.export)",
    )
    add_precision_flags(p)

    p = command(
        commands,
        "promote",
        "publish a checkpoint in a model repository if it is not worse than the version there",
        handlers.run_promote,
    )
    _with_config(p)
    p.add_argument(
        "--repository", required=True, metavar="REPO", help="the model repository (a folder or s3://...)"
    )
    p.add_argument(
        "--checkpoint",
        help="the candidate (default: the best in save_dir with training.keep_best, else the newest)",
    )
    p.add_argument("--split", help="the held-out validation split both are scored on (default: the first)")
    p.add_argument("--metric", choices=("rce", "auroc"), default="rce", help="what is compared (default rce)")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        help="a task the rule judges (full name); repeatable (default: every task)",
    )
    p.add_argument(
        "--tolerance",
        type=finite_number,
        default=0.0,
        help="how much worse (metric units) the interval's upper end may be (default 0)",
    )
    p.add_argument(
        "--weighted",
        action="store_true",
        help="judge the sum of the tasks' differences weighted by serving.engagement_weights (their size) "
        "instead of each task's",
    )
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap (default 0)")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="of the published version")
    add_precision_flags(p)  # not fp32: the candidate is judged as that program, which is then published
    add_repository_flags(p)

    p = command(
        commands,
        "predict",
        "score data files (TFRecord or Parquet) with an exported model",
        handlers.run_predict,
    )
    p.add_argument("--model", required=True, help="an exported model folder")
    p.add_argument(
        "--inputs",
        required=True,
        help="a glob of TFRecord or Parquet files (local or a URL), read as training reads them",
    )
    p.add_argument("--out", required=True, help="FILE.parquet or FILE.csv")
    p.add_argument("--batch-size", type=int, default=1024)

    p = command(commands, "serve", "HTTP ranking service for an exported model", handlers.run_serve)
    p.add_argument("--model", help="an exported model folder (or give --repository)")
    add_serve_flags(p)

    p = command(
        commands,
        "tune",
        "search settings with Optuna: each trial a training run scored on a validation split",
        handlers.run_tune,
    )
    p.add_argument("--config", "-c", help="the YAML config (not with --report)")
    p.add_argument("--set", action="append", default=[], metavar="DOTTED.PATH=VALUE", help="as for train")
    p.add_argument("--space", help="the search space YAML: objective and params (see docs/tuning.md)")
    p.add_argument("--trials", type=int, help="finished trials the study should hold (a rerun continues)")
    p.add_argument("--out", required=True, help="folder: study.db, trials/<N>/, best.yaml")
    p.add_argument("--storage", help="an SQLAlchemy URL for the study (default sqlite:///OUT/study.db)")
    p.add_argument("--seed", type=int, default=0, help="of the TPE sampler (give each worker its own)")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        metavar="SECONDS",
        help="a running trial's heartbeat; one silent for twice this is re-run (default 30)",
    )
    p.add_argument("--report", action="store_true", help="print the trials and importances, write a plot")

    p = command(
        commands, "demo", "generate data, train, evaluate and report on a small config", handlers.run_demo
    )
    _with_config(p)
    return parser


def log_level(verbose: bool) -> int:
    """Under torchrun (RANK set) every rank would log the same progress: rank 0 logs it, the others log
    warnings and errors only. Decided here, where logging is configured, not by the library."""
    if handlers.torchrun_rank() != 0:
        return logging.WARNING
    return logging.DEBUG if verbose else logging.INFO


def _redact_record(record: logging.LogRecord) -> bool:
    """Every log line as `redact` leaves it (URLs without credentials), whichever library logged it."""
    record.msg, record.args = redact(record.getMessage()), None
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=log_level(args.verbose),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)
    handlers.quiet_repeated_config_warnings()
    try:
        return args.handler(args)
    except ConfigError as e:
        for line in e.lines():
            print(redact(line), file=sys.stderr)
        return EXIT_USER_ERROR
    except SettingError as e:
        flag = None if e.source else flag_of(args.parser, e.setting)
        print(f"error: {flag} {e.problem}" if flag else f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (UserError, FileNotFoundError) as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno in OUT_OF_ROOM:
            # Wherever it happened (TensorBoard's files, a report), what was written before stays: checkpoints
            # and results are written atomically.
            print(redact(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror}"), file=sys.stderr)
            return EXIT_USER_ERROR
        # A rename's filename2 is the name the person gave; its filename is the temporary written first.
        path = e.filename2 or e.filename
        if e.errno not in IN_THE_WAY or not path:
            raise
        hint = IN_THE_WAY[e.errno]
        print(redact(f"error: {path}: {e.strerror}{' (' + hint + ')' if hint else ''}"), file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):  # a bug: its traceback
            raise
        print(f"error: {out_of_memory_words(e)} in `heavyranker {args.command}`", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
