"""Reading the project's YAML files: YAML 1.2 numbers, and errors that name the file.

PyYAML follows YAML 1.1, where a float needs a dot: ``lr: 1e-3`` is the *string* ``'1e-3'``, which then fails
deep inside the optimizer. :class:`ConfigLoader` is PyYAML's safe loader with YAML 1.2's float rule, so
``1e-3``, ``3E4`` and ``1.5e-4`` are numbers, as every other YAML reader (and every user) takes them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import yaml

# YAML 1.2 core schema floats (https://yaml.org/spec/1.2.2/#1023-core-schema): an exponent without a dot counts.
_FLOAT_1_2 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                            |[-+]?\.(?:inf|Inf|INF)
                            |\.(?:nan|NaN|NAN))$""", re.X)


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose floats follow YAML 1.2 (``1e-3`` is a float, not a string); integers, booleans
    and everything else resolve as in the safe loader (an int pattern is tried before this one)."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def load_yaml_mapping(path: str | Path, what: str = "config file") -> Dict[str, Any]:
    """The top-level mapping of YAML file ``path`` (read with :class:`ConfigLoader`).

    Raises FileNotFoundError (missing), IsADirectoryError (a directory), or ValueError naming the file when it
    is not valid YAML, is empty (only comments) or holds something other than a mapping of ``key: value``.
    ``what`` names the file's role in the messages (``"config file"``)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; pass the YAML file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=ConfigLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {exc}") from exc
    if values is None:
        raise ValueError(f"{what} {str(path)!r} is empty: it needs at least one of the sections model, data, train")
    if not isinstance(values, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a mapping of sections (model:, data:, train:), got "
                         f"{type(values).__name__}")
    return values
