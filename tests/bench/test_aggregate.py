import math
import random

import pytest

from bayes_sparse.bench.aggregate import aggregate, mean_ci, pareto_front
from bayes_sparse.bench.report import summary_markdown


def test_ci_by_hand():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, t_{0.975, 3} = 3.182446305284263
    s = mean_ci([1.0, 2.0, 3.0, 6.0])
    assert s.mean == 3.0 and s.n == 4
    assert s.half_width == pytest.approx(3.182446305284263 * math.sqrt(14 / 3) / 2, rel=1e-12)
    # two seeds: t_{0.975, 1} = 12.706204736174698, s = |a - b| / sqrt(2), half-width = t * |a - b| / 2
    assert mean_ci([0.01, 0.02]).half_width == pytest.approx(12.706204736174698 * 0.01 / 2, rel=1e-12)
    assert mean_ci([5.0]).half_width is None


def brute_front(points):
    return sorted(i for i, (e, c) in enumerate(points)
                  if not any((e2 < e and c2 >= c) or (e2 <= e and c2 > c) for e2, c2 in points))


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 12)
        grid = [0.01 * k for k in range(5)]  # few distinct values: ties and duplicate points happen
        pts = [(rng.choice(grid), rng.choice([1.0, 2.0, 5.0, 10.0])) for _ in range(n)]
        front = pareto_front(pts)
        assert sorted(front) == brute_front(pts), pts
        assert [pts[i][1] for i in front] == sorted(pts[i][1] for i in front)


def row(net, method, value, seed, err, comp, units):
    return {"net": net, "method": method, "strength": "penalty", "value": value, "seed": seed, "test_error": err,
            "val_error": err, "compression": comp, "units_kept": units, "speedup_batch1": None,
            "layers": [{"name": "0", "density": 1 / comp}, {"name": "2", "density": 1.0}],
            "log_alpha_hist": {"edges": [0, 1, 2], "counts": [seed, 1]}}


def test_aggregate_groups_over_seeds():
    rows = [row("n", "l0", 0.1, s, e, c, [10 + s, 3]) for s, e, c in ((0, 0.1, 2.0), (1, 0.3, 4.0))]
    rows.append(row("n", "l0", 0.5, 0, 0.2, 8.0, [5, 3]))
    g1, g2 = aggregate(rows)
    assert (g1.value, g1.seeds, g2.value, g2.seeds) == (0.1, (0, 1), 0.5, (0,))
    assert g1.stats["test_error"].mean == pytest.approx(0.2)
    assert g1.stats["units_kept_total"].mean == 13.5 and g1.units_kept == [10.5, 3]
    assert "speedup_batch1" not in g1.stats  # None (not measured) is left out
    assert g1.layer_density == [("0", pytest.approx(0.375)), ("2", 1.0)]
    assert g1.log_alpha_hist["counts"] == [1, 2]


def test_summary_rounds_per_layer_units_averaged_over_seeds():
    rows = [row("n", "l0", 0.1, s, 0.1, 2.0, [287 + (s == 2), 96 + (s > 0), 10]) for s in (0, 1, 2)]
    table = summary_markdown(aggregate(rows))
    assert "| 287.3-96.7-10 |" in table and "287.333" not in table
