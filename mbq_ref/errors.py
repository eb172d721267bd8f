"""One base class for every "bad input" error, so the CLI can report them in one line (exit 2)."""

__all__ = ["MBQError"]


class MBQError(ValueError):
    """Invalid user input or data; the message names the problem and the fix."""
