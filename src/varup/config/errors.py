"""The one error type of a bad configuration: raised at planning time, naming the key."""
from __future__ import annotations


class ConfigError(ValueError):
    pass
