"""Naming a user's function in the config: ``package.module:function`` (``model.factory``,
``data.factory``), imported with an error that names the key, the value and the fix."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from pipedni.errors import ConfigError


def import_function(key: str, spec: str) -> Callable[..., Any]:
    """The function ``spec`` names; ``key`` is the config key that gave it (for the error)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} = {spec!r} is not 'package.module:function'; name the function, "
                          "e.g. mypkg.models:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key} = {spec!r}: cannot import {module_name} ({err}); install it or put "
                          "its directory on PYTHONPATH") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"{key} = {spec!r}: {module_name} has no function {attr!r}")
    return function


def call(key: str, function: Callable[..., Any], kwargs: dict) -> Any:
    """``function(**kwargs)``; arguments it does not take are a ConfigError naming ``key``."""
    section = key.rsplit(".", 1)[0]
    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{key} cannot take the arguments {kwargs}: {err}; fix {section}.factory_args") from None
    try:
        return function(**kwargs)
    except TypeError as err:  # passed on through **kwargs to something that does not take them
        raise ConfigError(f"{key} failed with {section}.factory_args = {kwargs}: TypeError: {err}; fix "
                          f"{section}.factory_args") from None
