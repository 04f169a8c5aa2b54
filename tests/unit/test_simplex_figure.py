"""The foundation demo's figure: files written, and the numbers behind it mean what they say."""

import torch
from PIL import Image

from experiments.pipelines.report import simplex as simplex_figure


def test_figure_and_table_are_written(tmp_path):
    written = simplex_figure.main(tmp_path)
    names = {p.name for p in written}
    assert names == {"simplex.png", "simplex.pdf", "simplex.md"}
    with Image.open(tmp_path / "simplex.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 200
    assert (tmp_path / "simplex.pdf").read_bytes().startswith(b"%PDF")
    table = (tmp_path / "simplex.md").read_text()
    assert table.count("\n| ") == len(simplex_figure.panels()) + 1  # header + one row each
    assert not list(tmp_path.glob(".*tmp"))  # no half-written leftovers


def test_path_visits_ties_and_summary_orders_temperatures():
    theta, x = simplex_figure.score_path(n=361)
    assert x.shape == (361, 3)
    tie = x[(theta - torch.pi).abs().argmin()]
    top = tie.sort(descending=True).values
    assert torch.isclose(top[0], top[1], atol=1e-2) and top[2] < top[1] - 1
    hot = simplex_figure.build_normalizer("softmax", temperature=4.0)(x)
    cold = simplex_figure.build_normalizer("softmax", temperature=0.25)(x)
    leak_hot, modes_hot = simplex_figure.path_summary(hot)
    leak_cold, modes_cold = simplex_figure.path_summary(cold)
    assert leak_hot > 10 * leak_cold and modes_hot > modes_cold
    corners = simplex_figure.to_plane(torch.eye(3))
    torch.testing.assert_close(corners, simplex_figure.VERTICES)


def test_each_recent_normaliser_is_drawn_or_named_as_off_the_simplex():
    drawn = {type(normalizer).__name__ for _, normalizer in simplex_figure.panels()}
    assert {"SSMax", "EntmaxAlpha"} <= drawn
    off = {"sigmoid", "softpick", "softmax_sink", "stickbreaking"}
    assert set(simplex_figure.OFF_SIMPLEX) == off
    _, x = simplex_figure.score_path(n=91)
    for name in simplex_figure.OFF_SIMPLEX:  # really off: some rows do not sum to one
        sums = simplex_figure.build_normalizer(name)(x).sum(-1)
        assert (sums - 1).abs().max() > 0.05, name
