import sys

import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import DenseOperator, dominant, with_spectrum

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return ts.spectral_density(DenseOperator(with_spectrum(dominant())), num_matvecs=80)


def test_plot_on_given_axes(result):
    fig, ax = plt.subplots()
    try:
        returned = ts.plot_spectral_density(result, ax)
        assert returned is ax
        (line,) = ax.get_lines()[:1]
        torch.testing.assert_close(torch.as_tensor(line.get_ydata()), result.density)
        assert ax.get_xlabel() == "eigenvalue"
        assert ax.get_yscale() == "linear"
    finally:
        plt.close(fig)


def test_method_and_log_scale_and_png(result, tmp_path):
    path = tmp_path / "density.png"
    before = plt.get_fignums()
    ax = result.plot(log=True, path=path)
    assert ax.get_yscale() == "log"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == before  # a saved figure is not registered with pyplot


def test_new_pyplot_figure_without_path(result):
    ax = ts.plot_spectral_density(result)
    try:
        assert ax.figure.number in plt.get_fignums()
    finally:
        plt.close(ax.figure)


def test_missing_matplotlib_names_the_extra(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        ImportError,
        match=r"plot_spectral_density needs matplotlib; install it "
        r"with pip install 'torch-secorder\[plot\]'\.",
    ):
        result.plot()


def test_wrong_result_type():
    with pytest.raises(
        TypeError,
        match=r"plot_spectral_density: result must be a "
        r"DensityResult; got TraceEstimate\.",
    ):
        ts.plot_spectral_density(ts.TraceEstimate(torch.zeros(()), torch.zeros(()), 1))
