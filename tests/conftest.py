import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from cellbench import config  # noqa: E402


@pytest.fixture
def study() -> dict:
    """The default study, as a fresh dict each test may change."""
    return copy.deepcopy(config.load_study(ROOT / "config" / "config.yaml"))
