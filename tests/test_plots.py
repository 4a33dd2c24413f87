"""The per-epoch accuracy picture."""

import builtins

import numpy as np
import pytest
from PIL import Image

from tfloop import plots
from tfloop.runner import Validation


def _results():
    return [
        Validation(
            epoch=e,
            step=10 * e,
            loss=1.0,
            top1=0.3 + 0.2 * e,
            moving_loss=2.0,
            moving_top1=0.25,
            train_top1=0.2 * e,
        )
        for e in range(3)
    ]


def test_accuracy_png(tmp_path):
    path = tmp_path / "accuracy.png"
    assert plots.accuracy(_results(), str(path), title="resnet_v1_small")
    image = np.asarray(Image.open(path))
    assert image.shape[:2] == (400, 600)  # figsize (6, 4) at 100 dpi.
    assert image.std() > 0  # Something is drawn.


def test_no_matplotlib_no_picture_and_a_warning(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "accuracy.png"
    assert not plots.accuracy(_results(), str(path), title="t")
    assert not path.exists()
    assert str(path) in caplog.text


@pytest.mark.parametrize(
    ("moving_batches", "label"),
    [
        (0, "validation, moving averages"),
        (4, "validation, moving averages (first 4 batches)"),
    ],
)
def test_legend_says_which_batches_the_moving_averages_cover(
    tmp_path, monkeypatch, moving_batches, label
):
    from matplotlib.axes import Axes

    labels, plot = [], Axes.plot

    def recording_plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    path = tmp_path / "accuracy.png"
    assert plots.accuracy(
        _results(), str(path), title="t", moving_batches=moving_batches
    )
    assert labels == ["train", label, "validation, recalibrated"]
