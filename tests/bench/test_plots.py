import pytest

pytest.importorskip("matplotlib")

from bayes_sparse.bench.aggregate import aggregate  # noqa: E402
from bayes_sparse.bench.plots import off_scale_ceiling, plot_tradeoff  # noqa: E402


def test_off_scale_ceiling_only_when_a_point_is_far_above_the_median():
    assert off_scale_ceiling([1.0, 1.2, 0.9, 3.9]) is None  # 3.9 < 4 x median 1.1
    assert off_scale_ceiling([1.0, 1.2, 0.9, 1.1, 60.0]) == pytest.approx(4 * 1.1)
    assert off_scale_ceiling([]) is None and off_scale_ceiling([float("nan"), 0.0]) is None


def _row(method, value, err, comp):
    return {"net": "n", "method": method, "strength": "penalty", "value": value, "seed": 0, "test_error": err,
            "val_error": err, "compression": comp, "units_kept": [3], "layers": [{"name": "0", "density": 1 / comp}]}


def test_tradeoff_draws_a_collapsed_run_at_the_top_edge_with_its_error(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr("bayes_sparse.bench.plots._save", lambda fig, path: seen.setdefault("fig", fig) and path)
    rows = [_row("vd", v, e, c) for v, e, c in ((1, 0.010, 10), (2, 0.011, 20), (3, 0.012, 40))]
    rows += [_row("l0", v, e, c) for v, e, c in ((1, 0.009, 5), (2, 0.6, 100))]  # collapsed: 60%
    plot_tradeoff(aggregate(rows), "n", tmp_path / "t.png")
    ax = seen["fig"].axes[0]
    top = ax.get_ylim()[1]
    assert top == pytest.approx(4 * 1.1)  # 4 x the median of 0.9, 1.0, 1.1, 1.2, 60 (%)
    assert [t.get_text() for t in ax.texts] == ["60%"]
    assert ax.texts[0].xy == pytest.approx((100, top))
    plt.close(seen["fig"])
