"""The handlers of `heavyranker <command>` (cli.py builds the parser): each parses no more than its
arguments, loads the config and calls the library function that does the work."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import Config, dump_config, load_config
from .config.serving import SERVING, ServeOptions
from .errors import UserError
from .memory import keep_freed_memory

EXIT_REFUSED = 1  # promote: the candidate was compared and refused


# Set for the ranks that `train --nproc` starts: it loaded the config before them and logged its warnings.
CONFIG_CHECKED = "HEAVYRANKER_CONFIG_CHECKED"


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (its RANK), 0 outside one."""
    return int(os.environ.get("RANK", "0"))


def quiet_repeated_config_warnings() -> None:
    """The config's warnings once per job: every torchrun rank loads the config, and `train --nproc`
    (CONFIG_CHECKED) logged them before it started the ranks; under a torchrun of the user's, rank 0 logs
    them."""
    if os.environ.get(CONFIG_CHECKED) or torchrun_rank() != 0:
        logging.getLogger("heavyranker.config.loader").setLevel(logging.ERROR)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set)


def run_config_validate(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def run_data_generate(args: argparse.Namespace) -> int:
    from .data.synthetic import generate_for_config

    generate_for_config(
        _load(args),
        out=args.out,
        examples=args.examples,
        files=args.files,
        seed=args.seed,
        world=args.world,
        id_effects=args.id_effects,
        rows_per_user=args.rows_per_user,
        rows_per_author=args.rows_per_author,
    )
    return 0


def run_data_dump(args: argparse.Namespace) -> int:
    from .data.dump import dump_batches

    config = _load(args)
    where, data = config.split_data(args.split)
    dump_batches(
        data,
        seed=config.training.seed,
        split=args.split,
        where=where,
        inputs=args.inputs,
        batches=args.batches,
        shuffle=not args.no_shuffle,
        out=args.out,
    )
    return 0


def run_data_stats(args: argparse.Namespace) -> int:
    from .data.stats import write_feature_stats

    config = _load(args)
    write_feature_stats(
        config.train_data, seed=config.training.seed, out=args.out, batches=args.batches, bins=args.bins
    )
    return 0


def run_data_cache(args: argparse.Namespace) -> int:
    from .data.cache import clear_cache, describe_cache

    print("\n".join((clear_cache if args.clear else describe_cache)(_load(args).data_sections)))
    return 0


def run_data_convert(args: argparse.Namespace) -> int:
    from .data.convert import convert_files

    config = _load(args)
    _, data = config.split_data(args.split)
    written = convert_files(data, to=args.to, out=args.out, inputs=args.inputs)
    print(f"wrote {len(written)} {args.to} files under {args.out}")
    return 0


def run_model_summary(args: argparse.Namespace) -> int:
    from .data.columns import feature_specs
    from .model.summary import print_summary

    config = _load(args)
    print_summary(config.model, feature_specs(config.train_data))
    return 0


def run_train(args: argparse.Namespace) -> int:
    check_nproc(args.nproc)
    if args.nproc and args.nproc > 1:
        from .runtime import launch_torchrun

        _load(args)  # a config's problems once, here, rather than once per rank
        os.environ[CONFIG_CHECKED] = "1"  # and its warnings: the ranks inherit the environment
        return launch_torchrun(sys.argv[1:], nproc=args.nproc)
    from .train.loop import train

    keep_freed_memory()  # for the training step; each torchrun worker comes through here too
    config = _load(args)
    if args.follow:
        config.training.follow = True
    if args.amp:
        config.training.precision = "bf16"
    promoter = None
    if config.training.promote is not None:
        from .release.follow import Promoter

        promoter = Promoter(config)
    train(config, on_checkpoint=promoter)
    if torchrun_rank() == 0:  # once per run, not once per torchrun worker
        print(what_the_run_wrote(config.training.save_dir))
    return 0


def what_the_run_wrote(save_dir: str | os.PathLike[str]) -> str:
    """Where a finished train's outputs are, so that the next command (evaluate, export) can be written."""
    from .run_folder import RunFolder

    run = RunFolder(save_dir)
    newest = run.newest_checkpoint()
    checkpoints = f"checkpoints/ (newest {newest.name})" if newest else "checkpoints/ (none)"
    return f"run folder {run.path}: {checkpoints}, metrics.jsonl, eval/, tensorboard/"


def check_nproc(nproc: int) -> None:
    """0 or 1: one process; more: one rank each, at most 4 per core (enough to try DDP on a small machine;
    100,000 would start 100,000 processes here)."""
    most = 4 * (os.cpu_count() or 1)
    if not 0 <= nproc <= most:
        raise UserError(f"train: --nproc is {nproc}; 0 or 1 is one process, more at most {most} (4 per core)")


def run_evaluate(args: argparse.Namespace) -> int:
    from .eval.evaluator import evaluate_command

    evaluate_command(_load(args), checkpoint=args.checkpoint, watch=args.watch, split=args.split)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .eval.compare import compare_runs
    from .serve.served_program import exported_program

    config_b = None
    if args.config_b or args.set_b:  # without --config-b, B is --config with --set, then --set-b
        config_b = (
            load_config(args.config_b, args.set_b)
            if args.config_b
            else load_config(args.config, args.set + args.set_b)
        )
    compare_runs(
        _load(args),
        args.run_a,
        args.run_b,
        split=args.split,
        step=args.step,
        resamples=args.resamples,
        seed=args.seed,
        html_path=args.html,
        config_b=config_b,
        exported=exported_program,
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .serve.export import export_model
    from .serve.repository import export_version, open_repository

    options = {
        "checkpoint": args.checkpoint,
        "format": args.format,
        "precision": args.precision,
        "table_precision": args.table_precision,
    }
    if args.repository:
        repository = open_repository(args.repository, args.model_name)
        version = export_version(repository, _load(args), keep=args.keep_versions, **options)
        print(repository.location(version))
        return 0
    export_model(_load(args), out=args.out, **options)
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from .release.promote import PromotionRule, promote
    from .serve.repository import open_repository

    rule = PromotionRule(
        metric=args.metric,
        tasks=tuple(args.task),
        tolerance=args.tolerance,
        resamples=args.resamples,
        seed=args.seed,
        weighted=args.weighted,
    )
    decision = promote(
        _load(args),
        open_repository(args.repository, args.model_name),
        checkpoint=args.checkpoint,
        split=args.split,
        rule=rule,
        format=args.format,
        precision=args.precision,
        table_precision=args.table_precision,
        keep=args.keep_versions,
    )
    outcome = f"published as version {decision.version}" if decision.published else "refused"
    print(f"{outcome}: {decision.reason}")
    return 0 if decision.published else EXIT_REFUSED


def run_predict(args: argparse.Namespace) -> int:
    from .serve.predict import predict_files

    predict_files(model_dir=args.model, inputs=args.inputs, out=args.out, batch_size=args.batch_size)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .serve.app import run_server

    flags = serve_flags_given(args)
    if (args.model is None) == ("repository" not in flags):
        raise UserError("serve: give --model (an exported folder) or --repository (a model repository)")
    run_server(args.model, **flags)
    return 0


def serve_flags_given(args: argparse.Namespace) -> dict[str, object]:
    return {
        name: value
        for name in ServeOptions.model_fields
        if (value := getattr(args, f"{SERVING}.{name}")) is not None
    }


def run_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from .tune.report import format_best, report_study
        from .tune.study import TuneOptions, run_tune
    except ModuleNotFoundError as e:
        if e.name != "optuna":
            raise
        raise UserError("tune needs Optuna: pip install 'heavyranker[tune]'") from None

    out = Path(args.out)
    if args.report:
        report = report_study(out, args.storage)
        if report is not None:
            print(f"plot: {report}")
        return 0
    missing = [
        flag
        for flag, given in (("--config", args.config), ("--space", args.space), ("--trials", args.trials))
        if given is None
    ]
    if missing:
        raise UserError(f"tune: give {', '.join(missing)} (or --report)")
    keep_freed_memory()  # the trials train
    options = TuneOptions(
        args.config, args.set, args.space, args.trials, out, args.storage, args.seed, args.heartbeat
    )
    best = run_tune(options)
    if best is None:
        print("no trial completed: no best.yaml")
    else:
        print(f"{format_best(best)}\nwritten: {out / 'best.yaml'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    keep_freed_memory()  # the demo trains
    run_demo(args.config, overrides=args.set)
    return 0
