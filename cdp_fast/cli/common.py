"""What the `cdp-fast` subcommand modules share: the program name and the usage error (exit 2)."""
from __future__ import annotations

__all__ = ["PROG", "UsageError"]

PROG = "cdp-fast"


class UsageError(Exception):
    """A bad command-line argument (exit status 2)."""
