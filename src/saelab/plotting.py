"""One way to make and write matplotlib figures: an Agg canvas per figure, never pyplot.

pyplot keeps every figure in a global registry until it is closed and picks its backend from the
environment; a plain `Figure` on its own Agg canvas needs neither, so plots work headless, from
threads and in worker processes, and are freed like any other object.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from saelab.io import atomic_path

DEFAULT_DPI = 100  # matplotlib's own default; the report's figure sizes are chosen for it
FILE_DPI = 110  # the diagnostics' stand-alone PNG files (`saelab l0`, `saelab diagnose`): a little sharper


def new_figure(width_in: float, height_in: float, dpi: float = DEFAULT_DPI) -> Any:
    """A `matplotlib.figure.Figure` of `width_in` × `height_in` inches on an Agg canvas.

    Figures are rendered at the dpi they were made with, so layout (`tight_layout`) and the PNG agree."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes, at its own dpi."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write the figure as a PNG at its own dpi, atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return Path(path)
