"""Periodic embeddings of the numeric features and a wide path per tower, on two worlds: bench/multitask.py's
measurement (each variant over several seeds, its RCE per task against a logistic regression, `compare`
against the config as shipped seed by seed, 95% intervals) run once per world.

    .venv/bin/python bench/numeric_wide.py [--config configs/local_small.yaml] [--seeds 0 1 2]
        [--world demo=config] [--world holdout=/data/holdout] [--variants periodic wide]
        [--runs runs/numeric_wide] [--resamples 1000] [--baseline-rows 200000]

A world is NAME=DIR: DIR holds the train, validation and validation_downsampled folders that `heavyranker
data generate --out DIR` writes (--world holdout for the second benchmark's); `config` reads the config's own
globs. Each world's runs go to --runs/NAME, and a finished run is reused. The summary, one entry per world,
goes to bench/results/numeric_wide.json (--results). The worlds a summary already in that file holds and this
run does not measure are kept, so that worlds can be measured by separate runs (at the same time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from multitask import VARIANTS, add_measure_options, measure
from results import add_results_option, write_results

SPLITS = ("validation", "validation_downsampled")


def data_overrides(folder: str) -> list[str]:
    """--set overrides pointing the config's train and validation splits at a generated data folder."""
    if folder == "config":
        return []
    root = Path(folder).resolve()
    return [f"train_data.inputs={root}/train/*.gz"] + [
        f"validation_data.{split}.inputs={root}/{split}/*.gz" for split in SPLITS
    ]


def world(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: give a world as NAME=DIR (or NAME=config)")
    return name, folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_measure_options(parser, Path("runs/numeric_wide"))
    parser.add_argument("--world", type=world, action="append", help="NAME=DIR; default: demo=config")
    parser.add_argument("--variants", nargs="+", default=["periodic", "wide"], choices=list(VARIANTS))
    add_results_option(parser, "numeric_wide")
    args = parser.parse_args()
    worlds = dict(args.world or [("demo", "config")])
    runs = args.runs.resolve()
    torch.set_num_threads(1)
    figures = {}
    for name, folder in worlds.items():
        print(f"=== world {name}")
        one = argparse.Namespace(**vars(args))
        one.runs, one.set = runs / name, [*args.set, *data_overrides(folder)]
        figures[name] = measure(one)
    earlier = kept_worlds(args.results, set(worlds))
    write_results("numeric_wide", {"worlds": {**earlier[0], **worlds}, **earlier[1], **figures}, args)


def kept_worlds(path: Path, measured: set[str]) -> tuple[dict, dict]:
    """({world: data folder}, {world: figures}) of the summary in `path`, for the worlds not in `measured`."""
    if not path.is_file():
        return {}, {}
    figures = json.loads(path.read_text())["figures"]
    folders = {name: folder for name, folder in figures["worlds"].items() if name not in measured}
    return folders, {name: figures[name] for name in folders}


if __name__ == "__main__":
    main()
