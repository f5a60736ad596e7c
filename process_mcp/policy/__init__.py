"""What operators decide about what agents run: the command policy (and, as it grows, limits and audit)."""

from .command import CommandPolicy

__all__ = ["CommandPolicy"]
