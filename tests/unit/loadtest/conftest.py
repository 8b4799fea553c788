"""`loadtest/` is run from the repository root (`python -m loadtest`), not installed: make it importable here."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
