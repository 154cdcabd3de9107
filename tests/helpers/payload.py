"""A pickle payload: the object that proves a loader ran code from a file it should have read
as data only."""

from __future__ import annotations

from pathlib import Path


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
