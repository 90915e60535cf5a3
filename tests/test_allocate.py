import itertools

import numpy as np
import pytest

from cvxq_export.allocate import Menu, allocate, cost_range
from cvxq_export.errors import InfeasibleBudget


def random_menu(rng, n_units, n_options, legal_p=0.8):
    cost = rng.integers(0, 50, size=(n_units, n_options)).astype(np.int64)
    dist = rng.random((n_units, n_options)) * 10
    legal = rng.random((n_units, n_options)) < legal_p
    legal[np.arange(n_units), rng.integers(0, n_options, n_units)] = True
    return Menu(cost, dist, legal)


def brute_force(menu, budget, fixed=0):
    best = np.inf
    options = [np.nonzero(menu.legal[i])[0] if menu.legal is not None else range(menu.cost.shape[1])
               for i in range(menu.n_units)]
    for combo in itertools.product(*options):
        c = fixed + sum(menu.cost[i, j] for i, j in enumerate(combo))
        if c <= budget:
            best = min(best, sum(menu.distortion[i, j] for i, j in enumerate(combo)))
    return best


def test_never_exceeds_budget_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        menu = random_menu(rng, int(rng.integers(1, 60)), int(rng.integers(1, 8)))
        fixed = int(rng.integers(0, 100))
        lo, hi = cost_range(menu, fixed)
        budget = int(rng.integers(lo, hi + 1))
        a = allocate(menu, budget, fixed)
        real = fixed + int(menu.cost[np.arange(menu.n_units), a.choice].sum())
        assert real == a.cost <= budget
        assert menu.legal[np.arange(menu.n_units), a.choice].all()


def test_matches_brute_force_on_small_menus():
    rng = np.random.default_rng(1)
    exact = total = 0
    for _ in range(200):
        menu = random_menu(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)))
        lo, hi = cost_range(menu)
        budget = int(rng.integers(lo, hi + 1))
        a = allocate(menu, budget)
        opt = brute_force(menu, budget)
        assert a.distortion >= opt - 1e-9  # brute force is the true optimum
        # the Lagrangian + greedy result is optimal for a budget at most one option's cost smaller
        slack = int(menu.cost.max() - menu.cost.min())
        assert a.distortion <= brute_force(menu, max(lo, budget - slack)) + 1e-9
        exact += abs(a.distortion - opt) < 1e-9
        total += 1
    assert exact / total > 0.8, f"only {exact}/{total} exactly optimal"


def test_matches_brute_force_exactly_on_convex_menus():
    """Bit-depth-like menus (convex decreasing distortion, unit cost steps): greedy is exact."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(2, 6))
        scale = rng.random((n, 1)) * 10 + 0.1
        cost = np.tile(np.arange(5, dtype=np.int64), (n, 1))
        dist = scale * 4.0 ** -np.arange(5)
        menu = Menu(cost, dist)
        budget = int(rng.integers(0, 4 * n + 1))
        assert allocate(menu, budget).distortion == pytest.approx(brute_force(menu, budget))


def test_monotone_in_budget():
    rng = np.random.default_rng(3)
    menu = random_menu(rng, 200, 6)
    lo, hi = cost_range(menu)
    prev = np.inf
    for budget in np.linspace(lo, hi, 40).astype(int):
        d = allocate(menu, int(budget)).distortion
        assert d <= prev + 1e-9
        prev = d


def test_infeasible_budgets_state_range():
    menu = Menu(np.array([[1, 4], [2, 8]], dtype=np.int64), np.array([[5.0, 1.0], [6.0, 2.0]]))
    with pytest.raises(InfeasibleBudget) as small:
        allocate(menu, 2, fixed_cost=1)
    assert (small.value.min_bytes, small.value.max_bytes) == (4, 13)
    assert "4" in str(small.value) and "13" in str(small.value)
    with pytest.raises(InfeasibleBudget):
        allocate(menu, 14, fixed_cost=1)
    assert allocate(menu, 4, fixed_cost=1).choice.tolist() == [0, 0]
    assert allocate(menu, 13, fixed_cost=1).choice.tolist() == [1, 1]


def test_certificate_lambda_consistent():
    """At the certificate's lambda, no unit can lower d + lam*c by moving down."""
    rng = np.random.default_rng(4)
    menu = random_menu(rng, 500, 9, legal_p=1.0)
    lo, hi = cost_range(menu)
    a = allocate(menu, (lo + hi) // 2)
    rows = np.arange(menu.n_units)
    obj = menu.distortion + a.lam * menu.cost
    chosen = obj[rows, a.choice]
    cheaper = np.where(menu.cost <= menu.cost[rows, a.choice][:, None], obj, np.inf).min(1)
    assert np.all(chosen <= cheaper + 1e-9 * np.abs(cheaper) + 1e-12)


def test_large_menu_runs():
    rng = np.random.default_rng(5)
    n = 200_000
    cost = np.tile(np.arange(9, dtype=np.int64) * 64 + 24, (n, 1))
    dist = rng.random((n, 1)) * 4.0 ** -np.arange(9)
    menu = Menu(cost, dist)
    lo, hi = cost_range(menu)
    a = allocate(menu, lo + (hi - lo) // 3)
    assert a.cost <= lo + (hi - lo) // 3
    assert a.cost >= lo + (hi - lo) // 3 - 64  # the greedy fill leaves less than one step unused


def test_dual_bound_is_a_lower_bound_and_tight_enough():
    """Weak duality on random small menus: bound <= the best plan (brute force) <= the allocator's plan."""
    from cvxq_export.allocate import lagrangian_bound

    rng = np.random.default_rng(7)
    for trial in range(40):
        menu = random_menu(rng, n_units=4, n_options=4)
        lo, hi = cost_range(menu)
        budget = int(rng.integers(lo, hi + 1))
        alloc = allocate(menu, budget)
        best = brute_force(menu, budget)
        assert alloc.dual_bound <= best + 1e-9 <= alloc.distortion + 1e-9, trial
        # any other multiplier gives a weaker (or equal) valid bound
        for lam in (0.0, alloc.lam / 2, alloc.lam * 2 + 0.1):
            assert lagrangian_bound(menu, budget, 0, lam) <= best + 1e-9


def test_menu_cost_unit_is_explicit():
    bits = Menu(np.array([[0, 16]], dtype=np.int64), np.array([[2.0, 0.0]]), unit="bits")
    assert bits.from_bytes(3) == 24 and bits.to_bytes(17) == 3
    assert allocate(bits, 16).choice.tolist() == [1]
    with pytest.raises(ValueError, match="bits"):
        allocate(bits, 16, unit="bytes")
    with pytest.raises(ValueError, match="cost unit"):
        Menu(np.array([[1]]), np.array([[0.0]]), unit="nibbles")
