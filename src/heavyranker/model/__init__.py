"""The ranking model: `build_model(model_config, feature_specs, label_rates) -> Ranker`."""

from .ranker import Ranker, build_model, module_name
from .restore import restore_weights

__all__ = ["Ranker", "build_model", "module_name", "restore_weights"]
