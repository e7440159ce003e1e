"""Typed, strictly validated configs for the seed's --mm-data/--mm-model/--mm-tool JSON files."""

from .base import ConfigError, from_dict, load_config, load_json, to_dict

__all__ = ["ConfigError", "from_dict", "load_config", "load_json", "to_dict"]
