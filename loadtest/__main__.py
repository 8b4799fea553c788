"""`python -m loadtest ...` from the repository root (see loadtest/README.md)."""

from __future__ import annotations

from .cli import main

main()
