"""What goes wrong loading a checkpoint, said so that the user knows which file to fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unreadable, of another architecture, or in an unknown layout."""


class IncompleteCheckpoint(CheckpointError):
    """A model folder lacks a file that one of its components needs."""

    def __init__(self, root: str, component: str, missing: str, detail: str = "") -> None:
        self.root = root
        self.component = component
        self.missing = missing  # the path, relative to root, that was looked for
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"model folder {root} is incomplete: {component} needs {missing}{suffix}")
