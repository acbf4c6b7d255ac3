"""The small shared modules: plotting (no pyplot state), dtype names, the seeded side stream."""

from __future__ import annotations

import pytest
import torch

from saelab.dtypes import DTYPES, dtype_from_name, dtype_name
from saelab.errors import ConfigError
from saelab.plotting import figure_png_bytes, new_figure, save_figure
from saelab.seeding import forked_generator, seeded_sampling

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_figures_never_touch_pyplot_and_render_at_their_own_dpi(tmp_path):
    fig = new_figure(4, 3, dpi=50)
    fig.subplots().plot([0, 1], [1, 0])
    png = figure_png_bytes(fig)
    assert png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (200, 150)
    path = save_figure(fig, tmp_path / "sub" / "f.png")
    assert path.read_bytes() == png and [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temp file left
    assert fig.canvas.manager is None  # pyplot manages (and keeps alive) only figures it made


def test_dtype_names_round_trip_and_errors_name_the_field():
    for name, dtype in DTYPES.items():
        assert dtype_from_name(name) is dtype and dtype_name(dtype) == name
    assert dtype_from_name("float64", "dtype", allowed=("float32", "float64")) is torch.float64
    with pytest.raises(ConfigError, match="model_dtype='bfloat16'.*float32, float64"):
        dtype_from_name("bfloat16", "model_dtype", allowed=("float32", "float64"))
    with pytest.raises(ConfigError, match="dtype='int8'"):
        dtype_from_name("int8")
    with pytest.raises(ConfigError, match="no saelab name"):
        dtype_name(torch.int8)


def test_forked_generator_draws_the_seeded_stream_and_restores_state():
    gen, twin = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.rand(3, generator=gen), torch.rand(3, generator=twin)
    with forked_generator(gen, 5):
        side = torch.rand(4, generator=gen)
    assert torch.equal(side, torch.rand(4, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=twin))


def test_seeded_sampling_seeds_the_global_rng_too_and_restores_it():
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    with seeded_sampling(object(), 7):  # no generator of its own
        inside = torch.rand(2)
    assert torch.equal(inside, torch.rand(2, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(2), expected_next)
