"""The confusion-matrix plot of an evaluation."""

from __future__ import annotations

import struct
from pathlib import Path

from tuneflow.evaluate import Evaluation, plot_confusion

PNG = b"\x89PNG\r\n\x1a\n"


def _size(png: Path) -> tuple[int, int]:
    """Width and height from the PNG header (the IHDR chunk comes first)."""
    return struct.unpack(">II", png.read_bytes()[16:24])


def test_confusion_plot_is_a_png_that_grows_with_the_labels(tmp_path):
    two = Evaluation({"accuracy": 0.75}, [[2, 1], [0, 1]], ["ham", "spam"], [0, 0, 1, 1])
    png = plot_confusion(two, tmp_path / "plots" / "cm.png")  # the folder is created
    assert png == tmp_path / "plots" / "cm.png"
    assert png.read_bytes()[:8] == PNG

    # Three labels, and an all-zero matrix (nothing scored), still plot; the cells keep their size.
    empty = Evaluation({}, [[0, 0, 0], [0, 0, 0], [0, 0, 0]], ["a", "b", "c"], [])
    out = plot_confusion(empty, tmp_path / "cm3.png", "Champion v2 on this eval split")
    assert out.read_bytes()[:8] == PNG
    (w2, h2), (w3, h3) = _size(png), _size(out)
    assert w3 > w2 and h3 > h2
