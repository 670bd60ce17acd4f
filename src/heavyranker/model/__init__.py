"""The ranking model: `build_model(config, input_shapes) -> Ranker`."""

from .ranker import Ranker, build_model, module_name

__all__ = ["Ranker", "build_model", "module_name"]
