"""Heatmaps stay legible: each cell's annotation is black or white, whichever contrasts more with the cell's
colour (dark red and dark blue cells get white text, pale cells black), and a value that rounds to zero
reads "0.00", never "-0.00". Known answers from the colour maps' ends and centre."""
import matplotlib.colors
import numpy as np

from mechscope import plotting


def test_cell_labels_never_read_negative_zero():
    assert plotting.cell_label(-0.001) == "0.00" and plotting.cell_label(-0.004) == "0.00"
    assert plotting.cell_label(-0.006) == "-0.01" and plotting.cell_label(0.5) == "0.50"
    assert plotting.cell_label(float("nan")) == "nan"


def _texts(monkeypatch, draw):
    seen = {}

    def keep(fig, path):
        seen["texts"] = [(t.get_text(), matplotlib.colors.to_hex(t.get_color())) for t in fig.axes[0].texts]
        seen["image"] = fig.axes[0].images[0]
        return path
    monkeypatch.setattr(plotting, "_save", keep)
    draw()
    return seen


def test_annotations_contrast_with_their_cells(monkeypatch, tmp_path):
    values = np.array([[1.0, -1.0, -0.001, 0.05]])           # dark red, dark blue, centre (white), pale
    seen = _texts(monkeypatch, lambda: plotting.heatmap(values, tmp_path / "h.png"))
    assert seen["texts"] == [("1.00", "#ffffff"), ("-1.00", "#ffffff"), ("0.00", "#000000"), ("0.05", "#000000")]
    tokens = np.array([[0.0, 1.0]])                            # Blues: white cell, dark blue cell
    seen = _texts(monkeypatch, lambda: plotting.token_heatmap(tokens, [["a", "b"]], tmp_path / "t.png"))
    assert seen["texts"] == [("a", "#000000"), ("b", "#ffffff")]
    seen = _texts(monkeypatch, lambda: plotting.heatmap(np.array([[0.0, 1.0]]), tmp_path / "v.png", diverging=False))
    assert seen["texts"] == [("0.00", "#ffffff"), ("1.00", "#000000")]   # viridis: dark purple, yellow
