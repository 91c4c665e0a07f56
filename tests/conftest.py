import copy
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from cellbench import config  # noqa: E402


@pytest.fixture
def study() -> dict:
    """The default study with one round per cell (one engine load: tests of rounds ask for
    more), as a fresh dict each test may change."""
    study = copy.deepcopy(config.load_study(ROOT / "config" / "config.yaml"))
    study["defaults"]["sweep"]["rounds"] = 1
    return study


@pytest.fixture(scope="session")
def bench():
    """scripts/bench_cell.py as a module: it runs inside containers, outside the package."""
    spec = importlib.util.spec_from_file_location("bench_cell", ROOT / "scripts" / "bench_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
