"""Where tests find the repository and the shared evaluation data (``../shared`` beside it)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
