"""The scripts of benchmarks/quality, loaded by file for the tests (tests/benchmarks, tests/test_recipes.py):
they are not a package, and import their siblings by bare name."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

QUALITY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality"


def load(name: str, module_name: Optional[str] = None) -> ModuleType:
    """A module of benchmarks/quality by file (``name``: the script's stem), registered in ``sys.modules`` as
    ``module_name`` (default ``quality_<name>``)."""
    spec = importlib.util.spec_from_file_location(module_name or f"quality_{name}", QUALITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
