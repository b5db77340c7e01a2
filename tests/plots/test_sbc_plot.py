"""The SBC ECDF-difference figure: one panel per parameter, failed ones flagged, the band of
latentsel.analysis.sbc, and bad input named."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from latentsel.analysis.sbc import ecdf_band
from latentsel.plots import save_figure
from latentsel.plots.sbc import sbc_ecdf_differences

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_DRAWS, N_REPS = 19, 40
BAND = ecdf_band(N_REPS, N_DRAWS)


def _ranks(rng, n_params):
    return rng.integers(0, N_DRAWS + 1, (n_params, N_REPS))


def test_one_panel_per_parameter_with_failures_flagged(rng, tmp_path):
    names = [f"theta[{i}]" for i in range(5)]
    failed = [False, True, False, False, True]
    fig = sbc_ecdf_differences(_ranks(rng, 5), N_DRAWS, names=names, failed=failed, band=BAND)
    assert len(fig.axes) == 5
    for ax, name, bad in zip(fig.axes, names, failed):
        assert ax.get_title() == (f"{name} (FAILED)" if bad else name)
        ecdf = ax.lines[-1]
        assert len(ecdf.get_xdata()) == N_DRAWS + 2
        assert (to_rgba(ecdf.get_color()) == to_rgba("tab:red")) == bad
    assert "40 replications, 19 draws" in fig.get_suptitle()
    path = save_figure(fig, tmp_path / "sbc.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    fig.clear()
    assert plt.get_fignums() == []


def test_the_line_is_the_ecdf_difference(rng):
    ranks = _ranks(rng, 2)
    fig = sbc_ecdf_differences(ranks, N_DRAWS, names=["a", "b"], title="calibration", band=BAND)
    assert fig.get_suptitle() == "calibration"
    assert all("FAILED" not in ax.get_title() for ax in fig.axes)
    line = fig.axes[1].lines[-1]
    z = np.arange(N_DRAWS + 2) / (N_DRAWS + 1)
    expected = (ranks[1][:, None] < np.arange(N_DRAWS + 2)).mean(axis=0) - z
    np.testing.assert_allclose(line.get_xdata(), z)
    np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-12)
    fig.clear()


def test_the_band_drawn_is_the_one_given(rng):
    fig = sbc_ecdf_differences(_ranks(rng, 1), N_DRAWS, names=["a"], band=BAND)
    (band,) = fig.axes[0].collections
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    np.testing.assert_allclose([ys.min(), ys.max()], [min(BAND["lower"].min(), 0), max(BAND["upper"].max(), 0)])
    fig.clear()


@pytest.mark.parametrize("change, argument", [
    ({"ranks": np.zeros((2, 5))}, "ranks"),
    ({"ranks": np.full((2, 5), N_DRAWS + 1)}, "ranks"),
    ({"n_draws": 0}, "n_draws"),
    ({"names": ["a"]}, "names"),
    ({"failed": [True]}, "failed"),
    ({"failed": [1, 0]}, "failed"),
    ({"level": 1.5}, "level"),
    ({"band": {"lower": np.zeros(3), "upper": np.zeros(3)}}, "band"),
    ({"band": None}, "band"),
])
def test_bad_input_names_its_argument(change, argument):
    args = dict(ranks=np.zeros((2, 5), dtype=int), n_draws=N_DRAWS, names=["a", "b"], band=BAND)
    with pytest.raises(ValueError, match=f"^{argument} "):
        sbc_ecdf_differences(**{**args, **change})
