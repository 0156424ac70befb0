"""CurvatureHistory: selection, CSV and JSON round trips, loading errors, the plot."""

import json
import math

import pytest

from torch_secorder import CurvatureHistory, CurvatureRecord


def sample(preconditioned=False):
    records = []
    for step, sharpness in [(0, 1.5), (10, 2.25), (20, 1.0 / 3.0)]:
        records += [
            CurvatureRecord(step, "eigenvalue", sharpness, 1e-7, 12, 0.01),
            CurvatureRecord(step, "eigenvalue", sharpness / 2, 2e-7, 0, 0.01, index=1),
            CurvatureRecord(step, "eigenvalue", sharpness / 3, 3e-7, 9, 0.01, group="fc.0"),
            CurvatureRecord(step, "trace", 10.0 + step, math.nan, 1, 0.001),
        ]
        if preconditioned and step:
            records.append(
                CurvatureRecord(step, "preconditioned_eigenvalue", 300.0 + step, 1e-3, 7, 0.02)
            )
        records.append(
            CurvatureRecord(step, "threshold", 380.0 if preconditioned else 20.0, 0.0, 0, 0.0)
        )
    records.append(CurvatureRecord(30, "eigenvalue", 0.5, 0.25, 400, 1.5, converged=False))
    return CurvatureHistory(records)


def test_selection_and_series():
    history = sample()
    assert len(history) == 16
    assert history.series("eigenvalue") == ([0, 10, 20, 30], [1.5, 2.25, 1.0 / 3.0, 0.5])
    assert history.series("eigenvalue", index=1) == ([0, 10, 20], [0.75, 1.125, 1.0 / 6.0])
    assert history.series("eigenvalue", group="fc.0")[1] == [0.5, 0.75, 1.0 / 9.0]
    assert [r.step for r in history.select("threshold")] == [0, 10, 20]
    assert len(history.select()) == 16 - 3  # the whole selection's records
    assert history.groups == ["fc.0"]
    assert history.num_matvecs == 3 * (12 + 9 + 1) + 400
    assert history[0].quantity == "eigenvalue"
    assert list(history)[-1].converged is False
    assert repr(history) == "CurvatureHistory(16 records, 4 checks, steps 0..30)"
    assert repr(CurvatureHistory()) == "CurvatureHistory(0 records, 0 checks)"


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_files_round_trip_exactly(tmp_path, suffix):
    history = sample(preconditioned=True)
    path = tmp_path / f"history.{suffix}"
    history.to_csv(path) if suffix == "csv" else history.to_json(path)
    loaded = CurvatureHistory.load(path)
    assert loaded == history
    assert loaded.series("eigenvalue", index=0)[1][2] == 1.0 / 3.0  # bitwise, not rounded
    assert math.isnan(loaded.select("trace")[0].residual)
    assert loaded.select("eigenvalue", group="fc.0")[0].group == "fc.0"
    assert loaded[0].group is None
    assert loaded[-1].converged is False
    assert type(loaded[0].step) is int
    assert type(loaded[0].num_matvecs) is int


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_the_model_own_group_stays_apart_from_the_whole_selection(tmp_path, suffix):
    # groups="module" names the model's own parameters "", the whole selection has no group
    records = [
        CurvatureRecord(0, "eigenvalue", 2.0, 1e-7, 5, 0.01),
        CurvatureRecord(0, "eigenvalue", 0.5, 1e-7, 5, 0.01, group=""),
        CurvatureRecord(0, "eigenvalue", 1.0, 1e-7, 5, 0.01, group="fc.0"),
    ]
    history, path = CurvatureHistory(records), tmp_path / f"history{suffix}"
    history.to_csv(path) if suffix == ".csv" else history.to_json(path)
    loaded = CurvatureHistory.load(path)
    assert [r.group for r in loaded.records] == [None, "", "fc.0"]
    assert loaded.series("eigenvalue", group="") == ([0], [0.5])
    assert loaded.series("eigenvalue") == ([0], [2.0])


def test_csv_is_a_plain_table(tmp_path):
    sample().to_csv(tmp_path / "h.csv")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0] == "step,quantity,value,residual,num_matvecs,seconds,group,index,converged"
    assert lines[1] == "0,eigenvalue,1.5,1e-07,12,0.01,,0,True"


def _strict(token):
    raise ValueError(f"not standard JSON: {token}")


def test_json_names_its_format_in_standard_json(tmp_path):
    # numbers that are not finite (a residual of NaN, an infinite threshold) are strings
    # float() reads back: strict parsers refused the NaN and Infinity tokens
    history = sample(preconditioned=True)
    history.records.append(CurvatureRecord(30, "threshold", math.inf, 0.0, 0, 0.0))
    history.to_json(tmp_path / "h.json")
    document = json.loads((tmp_path / "h.json").read_text(), parse_constant=_strict)
    assert CurvatureHistory.load(tmp_path / "h.json") == history
    assert document["format"] == "torch_secorder.CurvatureHistory"
    assert document["version"] == 1
    assert document["records"][0]["quantity"] == "eigenvalue"


def test_equality():
    assert sample() == sample()
    assert sample() != sample(preconditioned=True)
    assert CurvatureHistory() != []
    with pytest.raises(TypeError):
        hash(CurvatureHistory())


def test_load_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"CurvatureHistory\.load: path must end in \.csv or \.json; got '.*h\.txt'\.",
    ):
        CurvatureHistory.load(tmp_path / "h.txt")
    (tmp_path / "other.json").write_text('{"records": []}')
    with pytest.raises(
        ValueError,
        match=r"CurvatureHistory\.load: '.*other\.json' holds no curvature history; expected a "
        r"JSON object with format 'torch_secorder\.CurvatureHistory'",
    ):
        CurvatureHistory.load(tmp_path / "other.json")
    (tmp_path / "short.csv").write_text("step,quantity,value\n0,eigenvalue,1.0\n")
    with pytest.raises(
        ValueError, match=r"CurvatureHistory\.load: a record lacks the fields \['residual'"
    ):
        CurvatureHistory.load(tmp_path / "short.csv")


def lines_of(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_draws_sharpness_threshold_and_groups(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sharpness.png"
    ax = sample().plot(path=path, label="eta=0.1")
    assert path.stat().st_size > 0
    lines = lines_of(ax)
    assert set(lines) == {
        r"eta=0.1: $\lambda_{\max}(H)$",
        "eta=0.1: eigenvalues 2..2",
        "eta=0.1: fc.0 (own block)",
        "eta=0.1: stability threshold",
    }
    sharpness = lines[r"eta=0.1: $\lambda_{\max}(H)$"]
    assert list(sharpness.get_xdata()) == [0, 10, 20, 30]
    assert list(lines["eta=0.1: stability threshold"].get_ydata()) == [20.0] * 3
    assert ax.get_xlabel() == "step"


def test_plot_of_an_adaptive_optimizer_puts_the_threshold_on_the_preconditioned_curve():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    history = sample(preconditioned=True)
    ax = history.plot(Figure().add_subplot(), color="C3", groups=False)
    lines = lines_of(ax)
    assert set(lines) == {r"$\lambda_{\max}(P^{-1}H)$", "stability threshold"}
    assert lines["stability threshold"].get_color() == "C3"
    ax = history.plot(Figure().add_subplot(), quantity="eigenvalue", log=True)
    assert "stability threshold" not in lines_of(ax)  # 38/eta bounds P^{-1}H, not H
    assert ax.get_yscale() == "log"


def test_plot_refuses_other_quantities():
    pytest.importorskip("matplotlib")
    with pytest.raises(
        ValueError,
        match=r"CurvatureHistory\.plot: quantity must be one of 'eigenvalue', "
        r"'preconditioned_eigenvalue'; got 'trace'\.",
    ):
        sample().plot(quantity="trace")
