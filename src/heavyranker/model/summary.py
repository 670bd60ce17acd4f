"""`heavyranker model summary`: the modules of the model a config builds, with their parameter counts."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..config.model import ModelConfig
from ..data.batch import Spec
from .ranker import build_model


def summary_lines(model: nn.Module) -> list[str]:
    """A line per module holding parameters (indented by depth, counts include submodules), then the total."""
    rows = []
    for name, module in model.named_modules():
        count = sum(p.numel() for p in module.parameters())
        if name and count:
            depth = name.count(".")
            label = "  " * depth + name.rsplit(".", 1)[-1]
            rows.append((f"{label} ({type(module).__name__})", f"{count:,}", _shapes(module)))
    total = sum(p.numel() for p in model.parameters())
    rows.append(("total", f"{total:,}", ""))
    width = max(len(r[0]) for r in rows)
    numbers = max(len(r[1]) for r in rows)
    return [f"{label:<{width}}  {count:>{numbers}}  {shapes}".rstrip() for label, count, shapes in rows]


def _shapes(module: nn.Module) -> str:
    """The shapes of a module's own parameters, for the leaves a reader checks against a checkpoint."""
    own = [f"{n} {list(p.shape)}" for n, p in module.named_parameters(recurse=False)]
    return ", ".join(own)


def print_summary(model_config: ModelConfig, feature_specs: Mapping[str, Spec]) -> None:
    model = build_model(model_config, feature_specs)
    inputs = ", ".join(f"{name} {list(spec.shape)}" for name, spec in feature_specs.items())
    print(f"inputs per example: {inputs}")
    print(f"tasks: {len(model.task_names)} ({model_config.multi_task_type.value})")
    for line in summary_lines(model):
        print(line)
