"""The flags every command shares, made from the config dataclasses.

Each field of the configs in `tt_mimic.config` becomes one flag with the
field's name (or its `flag` name), default, help, bounds and choices, so a
default is written once, in the dataclass. A validator builds the configs
from the parsed flags, so the command line refuses exactly what the Python
API refuses, with the same message. Every command imports this module, so
every flagfile in flags/ parses with every command.
"""

from __future__ import annotations

import dataclasses
import os
import typing

from absl import flags
from absl import logging

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic import config as config_lib

FLAGS = flags.FLAGS

MODEL_DIR = flags.DEFINE_string("model_dir", "saved_models/run",
                                "Run directory: artifacts, logs, exports.")
CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Ingest cache directory (default <model_dir>/ingest; "
    "a run copies what it uses from elsewhere into its own directory).")


def _limits(meta) -> str:
  """The accepted values, for the help text."""
  if meta.get("choices"):
    return f" One of: {', '.join(map(str, meta['choices']))}."
  lower, upper = meta.get("lower"), meta.get("upper")
  if lower is not None and upper is not None:
    return f" From {lower} to {upper}."
  if lower is not None:
    return f" At least {lower}."
  return ""


def _define(cls) -> dict[str, str]:
  """Defines one flag per field of `cls`; returns {field name: flag name}.

  Bounds and choices are checked by the configs alone (see `_validate`), so
  the command line refuses a value with the same message as the Python API.
  """
  hints = typing.get_type_hints(cls)
  names = {}
  for field in dataclasses.fields(cls):
    meta = field.metadata
    name = meta.get("flag") or field.name
    kind, default = hints[field.name], field.default
    text = meta["help"] + _limits(meta)
    if typing.get_origin(kind) is tuple:
      flags.DEFINE_list(name, [str(v) for v in default], text)
    elif kind is bool:
      flags.DEFINE_bool(name, default, text)
    elif kind is int:
      flags.DEFINE_integer(name, default, text)
    elif kind is float:
      flags.DEFINE_float(name, default, text)
    else:
      flags.DEFINE_string(name, default, text)
    names[field.name] = name
  return names


def _values(cls, names: dict[str, str], values) -> dict:
  """Field values of `cls` from flag values (a mapping by flag name)."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  out = {}
  for field, name in names.items():
    value = values[name]
    if typing.get_origin(hints[field]) is tuple:
      each = fields[field].metadata["each"]
      try:
        value = tuple(each(v) for v in value if str(v).strip())
      except ValueError:
        raise ValueError(f"--{name}: {list(value)} is not a list of "
                         f"{each.__name__}.") from None
    out[field] = value
  return out


_RUN = {section: (cls, _define(cls))
        for section, cls in config_lib.SECTIONS.items()}
_SERVE = (config_lib.ServeConfig, _define(config_lib.ServeConfig))
RUN_FLAGS = tuple(name for _, names in _RUN.values() for name in names.values())
SERVE_FLAGS = tuple(_SERVE[1].values())


def _build_run(values) -> config_lib.RunConfig:
  return config_lib.RunConfig(**{
      section: cls(**_values(cls, names, values))
      for section, (cls, names) in _RUN.items()})


def _validate(values) -> bool:
  try:
    _build_run(values)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


def _validate_serve(values) -> bool:
  cls, names = _SERVE
  try:
    cls(**_values(cls, names, values))
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_multi_flags_validator(list(RUN_FLAGS), _validate)
flags.register_multi_flags_validator(list(SERVE_FLAGS), _validate_serve)


def run_config() -> config_lib.RunConfig:
  """The run's configs from the parsed flags."""
  return _build_run({name: FLAGS[name].value for name in RUN_FLAGS})


def serve_config() -> config_lib.ServeConfig:
  cls, names = _SERVE
  return cls(**_values(cls, names, {n: FLAGS[n].value for n in SERVE_FLAGS}))


def given(names) -> list[str]:
  """The flags of `names` set on the command line or in a flagfile."""
  return [name for name in names if not FLAGS[name].using_default_value]


def note_ignored(keep=(), decides: str = "The run's config.json") -> None:
  """Logs the run flags that a command on an existing run does not use."""
  ignored = [n for n in given(RUN_FLAGS) if n not in keep]
  if ignored:
    logging.info("%s decides; ignoring --%s.", decides, ", --".join(ignored))


def write_flags(model_dir: str, *modules) -> None:
  """Writes the resolved flags to <model_dir>/flags.cfg (a flagfile)."""
  os.makedirs(model_dir, exist_ok=True)
  lines = [flag.serialize()
           for module in (__name__,) + tuple(m.__name__ for m in modules)
           for flag in FLAGS.get_flags_for_module(module)]
  with open(os.path.join(model_dir, "flags.cfg"), "w") as f:
    f.write("\n".join(sorted(lines)) + "\n")
