"""Config: YAML in, frozen typed model out. Knows nothing of sockets."""

from lbd.config.errors import ConfigError, Problem
from lbd.config.loader import load_file, load_text
from lbd.config.model import Config, Endpoint, ListenerSpec, Service, ServicePort, listeners_of

__all__ = [
    "Config",
    "ConfigError",
    "Endpoint",
    "ListenerSpec",
    "Problem",
    "Service",
    "ServicePort",
    "listeners_of",
    "load_file",
    "load_text",
]
