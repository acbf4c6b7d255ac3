"""Consoles that fit their medium: a terminal's width on a terminal, no width limit on a file or a pipe.

rich lays tables out for 80 columns (or the width of whatever terminal the process has) even when the
output goes to a file, so a piped results table came out cut ("matryo…") and wrapped. Written anywhere
but a terminal, `MediumConsole` has no width to fit: every name and value prints whole, each row on one
line. An explicit $COLUMNS still wins.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

# Wide enough for any row saelab prints; rich pads nothing to the console width, so this costs nothing.
UNBOUNDED_WIDTH = 10_000


class MediumConsole(Console):
    """A rich Console whose width is the terminal's on a terminal and unbounded elsewhere (unless $COLUMNS is set)."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        columns = self._environ.get("COLUMNS")
        if self._width is None and not self.is_terminal and not (columns and columns.isdigit()):
            return ConsoleDimensions(UNBOUNDED_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size
