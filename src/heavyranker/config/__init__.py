"""Config models, one module per YAML section, and the loader."""

from .loader import ConfigError, dump_config, load_config
from .root import Config, short_names

__all__ = ["Config", "ConfigError", "dump_config", "load_config", "short_names"]
