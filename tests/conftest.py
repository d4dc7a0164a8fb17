"""Tests read the shared data through FASTDARTS_DATA (default: ../shared/data beside the repo)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FASTDARTS_DATA", str(REPO.parent / "shared" / "data"))
