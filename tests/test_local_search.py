"""The two-limit local search (bytes and time) against brute force on tiny menus."""
import itertools

import numpy as np

from cvxq_export.allocate import Menu, allocate
from cvxq_export.local_search import best_polished, fill, polish, repair


def _menu(rng, n_units=6, n_options=4):
    cost = rng.integers(1, 40, size=(n_units, n_options)).astype(np.int64)
    dist = rng.random((n_units, n_options)) * 10
    times = rng.random((n_units, n_options)) * 5
    return Menu(cost, dist), times


def _brute(m, times, time_cap, bytes_cap):
    best = np.inf
    for combo in itertools.product(range(m.n_options), repeat=m.n_units):
        c = np.array(combo)
        r = np.arange(m.n_units)
        if m.cost[r, c].sum() <= bytes_cap and times[r, c].sum() <= time_cap:
            best = min(best, m.distortion[r, c].sum())
    return best


def test_polish_is_feasible_and_never_worse_than_the_lagrangian_points():
    rng = np.random.default_rng(3)
    r = np.arange(6)
    for _ in range(30):
        m, times = _menu(rng)
        bytes_cap = int(m.cost.min(1).sum() + 0.5 * (m.cost.max(1).sum() - m.cost.min(1).sum()))
        time_cap = float(times.min(1).sum() + rng.uniform(0.2, 0.8) * (times.max(1).sum() - times.min(1).sum()))
        # the Lagrangian points a multiplier search would visit: byte-feasible, time unchecked
        starts = [allocate(Menu(m.cost, m.distortion + mu * times), bytes_cap).choice for mu in (0, 0.3, 1, 3, 10, 1e3)]
        choice, k = best_polished(m, starts, times, time_cap, bytes_cap)
        optimum = _brute(m, times, time_cap, bytes_cap)
        if choice is None:  # every start failed to repair: the brute force must agree it is hard
            assert all(polish(m, s, times, time_cap, bytes_cap) is None for s in starts)
            continue
        assert m.cost[r, choice].sum() <= bytes_cap
        assert times[r, choice].sum() <= time_cap + 1e-9
        d = m.distortion[r, choice].sum()
        assert d >= optimum - 1e-9
        feasible_starts = [m.distortion[r, s].sum() for s in starts
                           if times[r, s].sum() <= time_cap and m.cost[r, s].sum() <= bytes_cap]
        if feasible_starts:
            assert d <= min(feasible_starts) + 1e-9  # polishing only improves a feasible start
        assert 0 <= k < len(starts)


def test_repair_meets_the_time_cap_within_bytes_and_fill_spends_slack():
    # two units; option 0 cheap, fast and bad, option 1 dear, slow and good
    m = Menu(np.array([[1, 5], [1, 5]]), np.array([[10.0, 1.0], [8.0, 3.0]]))
    times = np.array([[0.0, 3.0], [0.0, 2.0]])
    slow = np.array([1, 1])  # 5 us: over a 3 us cap
    fixed = repair(m, slow, times, 3.0, 10)
    # the cheapest repair gives up unit 1's option (5 distortion for 2 us) rather than unit 0's (9 for 3 us)
    assert list(fixed) == [1, 0]
    assert repair(m, slow, times, -1.0, 10) is None  # no plan is that fast
    # fill from the all-cheap plan with room for one upgrade: the larger saving per share used wins
    assert list(fill(m, np.array([0, 0]), times, 3.0, 6)) == [1, 0]
    assert list(fill(m, np.array([0, 0]), times, 2.5, 6)) == [0, 1]  # unit 0's upgrade no longer fits
