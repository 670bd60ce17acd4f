"""A benchmark's summary as a file, bench/results/<name>.json by default, so that the figures in the docs
are generated from what a run wrote (docs/gen/benchmarks.py) rather than typed by hand. It holds when and on
what the figures were measured, the command's arguments and the figures themselves."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from heavyranker.cpu import PRECISION_FLAGS, CpuInfo, cpu_info

RESULTS = Path(__file__).resolve().parent / "results"


def add_results_option(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS / f"{name}.json",
        metavar="PATH",
        help="where the summary goes, as JSON (default: %(default)s)",
    )


def write_results(name: str, figures: dict[str, Any], args: argparse.Namespace) -> Path:
    """Writes {bench, date, machine, arguments, figures} to args.results and prints where."""
    summary = {
        "bench": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "arguments": {key: value for key, value in vars(args).items() if key != "results"},
        "figures": figures,
    }
    path: Path = args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return path


def machine() -> dict[str, Any]:
    """The facts a figure depends on. `cpus` is what this process may run on (taskset, a container's
    quota), not the machine's count; `cpu_flags` the bf16, AMX and VNNI flags present (heavyranker.cpu);
    torch's version without importing it (some benches never do)."""
    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "cpu_flags": _flags(cpu),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": metadata.version("torch"),
        "python": platform.python_version(),
    }


def cpu_line() -> str:
    """The CPU's model and its precision flags, for a bench to print with its figures."""
    cpu = cpu_info()
    return f"CPU: {cpu.model}; flags: {_flags(cpu)}"


def _flags(cpu: CpuInfo) -> str:
    return " ".join(cpu.precision_flags) or "none of " + " ".join(PRECISION_FLAGS)
