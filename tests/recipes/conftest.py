"""Make the recipe scripts importable as modules and point at the shared data."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def wikitext_dir() -> Path:
    folder = SHARED_DATA / "wikitext-2"
    if not (folder / "valid.txt").exists():
        pytest.fail(f"{folder} is missing: the tests need ../shared/data beside the repository")
    return folder
