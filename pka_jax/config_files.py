"""Config files loaded by path, as `--config=path:variant` loads them. Only ml_collections and
the file itself are imported: the commands read a config to explain a mistake in their flags
before JAX loads."""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import ml_collections


@functools.cache
def _config_module(path: str):
  spec = importlib.util.spec_from_file_location('config_' + re.sub(r'\W', '_', path), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(variant)` of the config file at `path`, as `--config=path:variant` loads it."""
  return _config_module(os.path.abspath(path)).get_config(variant)
