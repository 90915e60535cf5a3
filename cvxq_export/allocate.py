"""One Lagrangian allocator for every output format.

The model is cut into *units* (a tensor, or a row group x column group of one);
each unit picks one option from a menu of (exact cost, distortion) pairs. We
minimise total distortion subject to ``fixed_cost + sum(cost) <= budget``:

1. **Hull.** Per unit, only the lower convex hull of its legal (cost,
   distortion) points can ever be a Lagrangian choice, so the menu is reduced
   to it: a chain of *steps* (extra cost > 0, distortion saved > 0) whose
   savings per extra cost (*slopes*) do not increase along the chain.
2. **Multiplier.** At multiplier ``lam`` every unit independently minimises
   ``d + lam * c``, i.e. takes exactly its hull steps with slope > lam (ties go
   to the cheaper option). The total cost falls as ``lam`` grows, so we bisect
   for the smallest ``lam`` whose solution fits. The bisection runs over the
   candidate multipliers themselves (the step slopes, median pivot), which
   gives the exact minimal ``lam`` in ~log2(#steps) vectorised passes over a
   shrinking set instead of a fixed number of float iterations.
3. **Greedy fill.** What is left of the budget buys the remaining hull steps
   in order of slope, a unit's steps in hull order, each one only if it still
   fits; a step that is skipped blocks the rest of its unit's chain. The
   result never exceeds the budget.

Certificate: the returned choice is a Lagrangian minimiser at ``lam`` plus the
greedy's upgrades, all of slope <= ``lam``, so every unit sits at or above its
Lagrangian argmin (in practice at most one hull step above it), and
``sum_u min_j (d + lam c) - lam * (budget - fixed_cost)`` is a lower bound on
the optimal distortion (weak duality): :func:`lagrangian_bound`, returned as
``Allocation.dual_bound``, so a plan says how far it can be from the best one.

NumPy only; memory stays at a few ``[n_units, n_options]`` arrays because the
hull is built in chunks of units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import InfeasibleBudget

_INT64_MAX = int(np.iinfo(np.int64).max)
COST_UNITS = ("bits", "bytes")
UNIT_BITS = {"bits": 1, "bytes": 8}
_CHUNK = 1 << 17  # units per hull chunk: bounds the temporaries, keeps them cache friendly


class NonFiniteDistortion(ValueError):
    """A menu entry whose distortion is NaN or infinite (the weights or the sensitivities
    overflow: a damaged model); ``unit`` is the first such unit."""

    def __init__(self, unit: int):
        super().__init__(f"unit {unit} has a non-finite distortion")
        self.unit = unit


@dataclass
class Menu:
    """Per-unit options. Costs are exact integers in the caller's unit."""

    cost: np.ndarray  # [n_units, n_options] int64, >= 0 where legal
    distortion: np.ndarray  # [n_units, n_options] float64, finite where legal (normally >= 0)
    legal: np.ndarray | None = None  # [n_units, n_options] bool; None = all legal
    unit: str = "bytes"  # what a cost counts: "bytes" (GGUF) or "bits" (native, ONNX: sub-byte units)

    def __post_init__(self) -> None:
        if self.unit not in COST_UNITS:
            raise ValueError(f"menu cost unit must be one of {COST_UNITS}, got {self.unit!r}")
        cost = np.asarray(self.cost)
        if not np.issubdtype(cost.dtype, np.integer):
            raise TypeError(f"menu costs must be integers (exact bits or bytes), got {cost.dtype}")
        self.cost = cost.astype(np.int64, copy=False)
        self.distortion = np.asarray(self.distortion, dtype=np.float64)
        if self.cost.ndim != 2 or self.cost.shape != self.distortion.shape:
            raise ValueError(f"cost {self.cost.shape} and distortion {self.distortion.shape} must be equal 2-D shapes")
        if self.cost.shape[1] == 0:
            raise ValueError("menu has no options")
        if self.legal is not None:
            self.legal = np.asarray(self.legal, dtype=bool)
            if self.legal.shape != self.cost.shape:
                raise ValueError(f"legal {self.legal.shape} does not match cost {self.cost.shape}")
            none_legal = ~self.legal.any(1)  # [n_units]
            if none_legal.any():
                raise ValueError(f"unit {int(np.argmax(none_legal))} has no legal option")
        # Only legal entries are checked: formats fill illegal slots with anything.
        bad_d = ~np.isfinite(self.distortion)
        bad_c = self.cost < 0
        if self.legal is not None:
            bad_d &= self.legal
            bad_c &= self.legal
        if bad_d.any():
            raise NonFiniteDistortion(int(np.argmax(bad_d.any(1))))
        if bad_c.any():
            raise ValueError(f"unit {int(np.argmax(bad_c.any(1)))} has a negative cost")

    def from_bytes(self, n_bytes: int) -> int:
        """A byte count (a budget, fixed bytes) in this menu's cost unit."""
        return int(n_bytes) * 8 // UNIT_BITS[self.unit]

    def to_bytes(self, cost: int) -> int:
        """A cost in this menu's unit as whole bytes (rounded up: a partial byte is stored)."""
        return -(-int(cost) * UNIT_BITS[self.unit] // 8)

    def with_costs(self, distortion: np.ndarray | None = None, legal: np.ndarray | None = None) -> "Menu":
        """The same costs and unit with another distortion (a penalised one) or legality (a restriction)."""
        return Menu(self.cost, self.distortion if distortion is None else distortion,
                    self.legal if legal is None else legal, unit=self.unit)

    @property
    def n_units(self) -> int:
        return int(self.cost.shape[0])

    @property
    def n_options(self) -> int:
        return int(self.cost.shape[1])


@dataclass
class Allocation:
    choice: np.ndarray  # [n_units] intp, chosen option index per unit
    lam: float  # multiplier of the certificate (distortion per unit cost); 0 when nothing binds
    cost: int  # total, fixed_cost included; always <= budget
    distortion: float  # total distortion of the choice
    min_cost: int  # achievable range, fixed_cost included
    max_cost: int
    budget: int
    dual_bound: float = 0.0  # no plan of this menu within the budget has a lower distortion (weak duality)

    def to_dict(self) -> dict:
        return {"lam": self.lam, "cost": self.cost, "distortion": self.distortion, "min_cost": self.min_cost,
                "max_cost": self.max_cost, "budget": self.budget, "dual_bound": self.dual_bound}


def exact_sum(a: np.ndarray) -> int:
    """Sum of non-negative int64 values as a Python int (no silent int64 overflow)."""
    if a.size == 0:
        return 0
    if int(a.max()) <= _INT64_MAX // a.size:
        return int(a.sum(dtype=np.int64))
    return int(a.astype(object).sum())  # only for astronomically large costs


def _exact_cumsum(a: np.ndarray) -> np.ndarray:
    """Running sum of non-negative int64 values, int64 when safe, else Python ints."""
    if a.size and int(a.max()) > _INT64_MAX // a.size:
        return np.cumsum(a.astype(object))
    return np.cumsum(a, dtype=np.int64)


def _unit_min_max(menu: Menu) -> tuple[np.ndarray, np.ndarray]:
    """[n_units] cheapest and dearest legal cost per unit, without a masked copy of the menu."""
    where = True if menu.legal is None else menu.legal
    lo = np.min(menu.cost, axis=1, where=where, initial=_INT64_MAX)
    hi = np.max(menu.cost, axis=1, where=where, initial=0)
    return lo, hi


def cost_range(menu: Menu, fixed_cost: int = 0) -> tuple[int, int]:
    """Smallest and largest achievable totals, ``fixed_cost`` included."""
    lo, hi = _unit_min_max(menu)
    return fixed_cost + exact_sum(lo), fixed_cost + exact_sum(hi)


@dataclass
class Hull:
    """Each unit's lower convex hull as a chain of steps from its cheapest option.

    Unit u's hull points are ``option[u, :length[u]]``; step j goes from point j
    to point j + 1. Padding steps have slope -inf and cost 0.
    """

    option: np.ndarray  # [n_units, H] int16/int32 menu column of each hull point
    length: np.ndarray  # [n_units] int, number of hull points (>= 1)
    step_cost: np.ndarray  # [n_units, H - 1] int64, > 0 on real steps
    slope: np.ndarray  # [n_units, H - 1] float64, distortion saved per extra cost; non-increasing along a row


def hull_of(menu: Menu) -> Hull:
    """The lower convex hull of each unit's options; kept on the menu, which the plan and
    its rate-distortion curve both ask for (menus are not changed after they are built)."""
    cached = menu.__dict__.get("_hull")
    if cached is not None and cached[0] is menu.cost and cached[1] is menu.distortion and cached[2] is menu.legal:
        return cached[3]
    hull = _compute_hull(menu)
    menu.__dict__["_hull"] = (menu.cost, menu.distortion, menu.legal, hull)
    return hull


def _compute_hull(menu: Menu) -> Hull:
    n, o = menu.cost.shape
    idx_dtype = np.int16 if o <= np.iinfo(np.int16).max else np.int32
    option = np.zeros((n, o), dtype=idx_dtype)
    length = np.zeros(n, dtype=np.intp)
    step_cost = np.zeros((n, max(o - 1, 0)), dtype=np.int64)
    slope = np.full((n, max(o - 1, 0)), -np.inf)
    for r0 in range(0, n, _CHUNK):
        r1 = min(n, r0 + _CHUNK)
        legal = None if menu.legal is None else menu.legal[r0:r1]
        _hull_chunk(menu.cost[r0:r1], menu.distortion[r0:r1], legal,
                    option[r0:r1], length[r0:r1], step_cost[r0:r1], slope[r0:r1])
    h = int(length.max()) if n else 1
    if h < o:  # drop all-padding columns so later passes touch less memory
        option = np.ascontiguousarray(option[:, :h])
        step_cost = np.ascontiguousarray(step_cost[:, : h - 1])
        slope = np.ascontiguousarray(slope[:, : h - 1])
    return Hull(option, length, step_cost, slope)


def _hull_chunk(cost: np.ndarray, dist: np.ndarray, legal: np.ndarray | None, out_option: np.ndarray,
                out_length: np.ndarray, out_step_cost: np.ndarray, out_slope: np.ndarray) -> None:
    """Andrew's monotone chain on every unit of a chunk at once (loop over options, not units)."""
    m, o = cost.shape
    rows = np.arange(m)
    # Visit options by cost, then distortion; stable, so exact duplicates keep the lowest
    # column. Illegal options sort last and are never pushed.
    cost_key = cost if legal is None else np.where(legal, cost, _INT64_MAX)
    order = np.lexsort((dist, cost_key), axis=1)  # [m, o]
    st_c = np.zeros((m, o), dtype=np.int64)  # stack of hull points per unit
    st_d = np.zeros((m, o), dtype=np.float64)
    st_o = out_option  # [m, o] written in place
    size = np.zeros(m, dtype=np.intp)  # [m] stack height
    for k in range(o):
        col = order[:, k]  # [m]
        ck, dk = cost[rows, col], dist[rows, col]
        ok = np.ones(m, dtype=bool) if legal is None else legal[rows, col]
        # The top of the stack holds the lowest distortion seen so far at a cost <= ck:
        # anything not strictly better is dominated (this also drops equal-cost duplicates).
        top_d = st_d[rows, np.maximum(size - 1, 0)]
        push = np.flatnonzero(ok & ((size == 0) | (dk < top_d)))
        work = push[size[push] >= 2]
        while work.size:
            t = size[work] - 1
            s = t - 1
            ct, dt, cs, ds = st_c[work, t], st_d[work, t], st_c[work, s], st_d[work, s]
            # Pop the top while it lies strictly above the chord from the point below it to the
            # new point (slope(s->t) < slope(t->new), cross-multiplied to avoid dividing).
            # Collinear points stay: they give the greedy fill finer steps at the same slope.
            above = (ds - dt) * (ck[work] - ct).astype(np.float64) < (dt - dk[work]) * (ct - cs).astype(np.float64)
            work = work[above]
            size[work] -= 1
            work = work[size[work] >= 2]
        h = size[push]
        st_c[push, h], st_d[push, h], st_o[push, h] = ck[push], dk[push], col[push]
        size[push] += 1
    out_length[:] = size
    if o > 1:
        real = np.arange(o - 1)[None, :] < (size - 1)[:, None]  # [m, o-1] steps that exist
        dc = np.where(real, st_c[:, 1:] - st_c[:, :-1], 0)  # [m, o-1] > 0 on real steps
        with np.errstate(divide="ignore", invalid="ignore"):
            sl = np.where(real, (st_d[:, :-1] - st_d[:, 1:]) / dc, -np.inf)
        # Rounding in the division may break the non-increasing order of collinear slopes by an
        # ulp; the Lagrangian step relies on "steps with slope > lam" being a prefix of each chain.
        np.minimum.accumulate(sl, axis=1, out=sl)
        out_step_cost[:] = dc
        out_slope[:] = sl


def _smallest_feasible_lam(slope: np.ndarray, step_cost: np.ndarray, room: int) -> float:
    """Smallest multiplier whose Lagrangian solution fits ``room``.

    ``slope``/``step_cost`` [n_steps] are the positive-slope steps; taking all of them must
    not fit. The answer is one of the slopes (the total only changes there), so bisect over
    them with a median pivot, carrying the cost of the steps already known to be taken.
    """
    s, c = slope, step_cost
    taken = 0  # cost of steps with slope above the current bracket (taken for any lam in it)
    # Invariant: taken + sum(c) > room, so s is never empty.
    while True:
        k = s.size // 2
        pivot = float(np.partition(s, k)[k])
        above = s > pivot
        fits = taken + exact_sum(c[above])  # total cost of the solution at lam = pivot
        if fits > room:  # lam must be larger than pivot
            s, c = s[above], c[above]
            continue
        at = s == pivot
        with_ties = fits + exact_sum(c[at])  # total just below pivot
        if with_ties > room:
            return pivot
        below = s < pivot
        taken = with_ties
        s, c = s[below], c[below]


def _greedy_fill(hull: Hull, pos: np.ndarray, left: int) -> np.ndarray:
    """Spend ``left`` on the hull steps not taken yet, best slope first, never overspending.

    ``pos`` [n_units] is each unit's current hull point; returns the new positions.
    """
    n, m = hull.slope.shape
    if left <= 0 or m == 0:
        return pos
    j = np.arange(m)[None, :]
    pending = (j >= pos[:, None]) & (hull.slope > 0)  # [n, m] steps still to buy (zero gain is not worth cost)
    affordable = hull.step_cost <= min(left, _INT64_MAX)  # [n, m]
    # A step is reachable only if every pending step before it in its chain is affordable.
    reach = np.logical_and.accumulate(affordable | ~pending, axis=1) & pending
    flat = np.flatnonzero(reach)  # row-major: (unit, step) order
    if not flat.size:
        return pos
    # Best saving per cost first; the stable sort keeps each unit's steps in chain order on ties.
    flat = flat[np.argsort(-hull.slope.ravel()[flat], kind="stable")]
    cst = hull.step_cost.ravel()[flat]
    bought: list[np.ndarray] = []
    # Sequential greedy, vectorised in rounds: buy the longest prefix that fits; the next step
    # is skipped, which also blocks the later steps of its unit; drop everything that no longer
    # fits and repeat. Every round buys at least one step, so this terminates.
    while flat.size:
        cum = _exact_cumsum(cst)
        k = flat.size if left >= cum[-1] else int(np.searchsorted(cum, left, side="right"))
        if k:
            bought.append(flat[:k])
            left -= int(cum[k - 1])
        if k == flat.size:
            break
        flat, cst = flat[k:], cst[k:]  # flat[0] no longer fits
        unit = flat // m
        bad = np.flatnonzero(cst > left)
        bad_units, first = np.unique(unit[bad], return_index=True)  # first skipped step per unit
        where = np.minimum(np.searchsorted(bad_units, unit), bad_units.size - 1)
        blocked = (bad_units[where] == unit) & (np.arange(flat.size) >= bad[first][where])
        keep = ~blocked  # the skipped steps themselves are among the blocked ones
        flat, cst = flat[keep], cst[keep]
    if bought:
        steps = np.concatenate(bought)
        pos = pos.copy()
        # A unit's bought steps continue its chain from pos, so the last one sets the position.
        np.maximum.at(pos, steps // m, steps % m + 1)
    return pos


def allocate(menu: Menu, budget: int, fixed_cost: int = 0, *, unit: str | None = None) -> Allocation:
    """Minimise total distortion subject to ``fixed_cost + total cost <= budget``, both in
    the menu's cost unit (``menu.unit``; ``unit``, if given, must agree with it).

    Raises :class:`InfeasibleBudget` when ``budget`` lies outside the achievable range
    (above it too: no plan can use more than the dearest one).
    """
    if unit is not None and unit != menu.unit:
        raise ValueError(f"allocate(unit={unit!r}) on a menu whose costs are in {menu.unit}")
    unit = menu.unit
    budget, fixed_cost = int(budget), int(fixed_cost)
    min_cost, max_cost = cost_range(menu, fixed_cost)
    if not min_cost <= budget <= max_cost:
        raise InfeasibleBudget(budget, min_cost, max_cost, unit)
    hull = hull_of(menu)
    rows = np.arange(menu.n_units)
    # Every chain starts at the unit's cheapest option, so work with what the budget allows
    # beyond the cheapest plan.
    room = budget - min_cost
    gain = hull.slope > 0  # [n, m] steps that lower distortion
    if exact_sum(hull.step_cost[gain]) <= room:
        lam = 0.0  # the budget does not bind: every unit takes its lowest distortion
        take = gain
    else:
        lam = _smallest_feasible_lam(hull.slope[gain], hull.step_cost[gain], room)
        take = hull.slope > lam
    del gain
    pos = take.sum(1)  # [n] Lagrangian argmin at lam (ties to the cheaper option)
    left = room - exact_sum(hull.step_cost[take])
    del take
    pos = _greedy_fill(hull, pos, left)
    choice = hull.option[rows, pos].astype(np.intp)  # [n]
    cost = fixed_cost + exact_sum(menu.cost[rows, choice])
    if cost > budget:  # a broken invariant, not a user error
        raise AssertionError(f"allocator overspent: {cost} > {budget}")
    distortion = float(menu.distortion[rows, choice].sum())
    bound = min(distortion, lagrangian_bound(menu, budget, fixed_cost, lam))  # rounding must not put it above
    return Allocation(choice, lam, cost, distortion, min_cost, max_cost, budget, bound)


def lagrangian_bound(menu: Menu, budget: int, fixed_cost: int, lam: float) -> float:
    """The Lagrangian dual at ``lam`` >= 0: ``sum_u min_j (d_uj + lam c_uj) - lam (budget - fixed_cost)``.

    Weak duality: for every plan within the budget, ``sum d <= sum d + lam (budget - fixed - sum c)``,
    and the right side is at least this value, so no plan of this menu within the budget has a
    lower total distortion. At the allocator's ``lam`` it is the best such bound (the dual is
    concave in ``lam`` and maximal where the Lagrangian solution's cost crosses the budget), so
    ``distortion - bound`` says how far the plan can be from the best plan of the menu.
    """
    total = 0.0
    for start in range(0, menu.n_units, _CHUNK):  # chunks bound the [units, options] temporaries
        stop = min(start + _CHUNK, menu.n_units)
        pen = menu.distortion[start:stop] + lam * menu.cost[start:stop]  # [chunk, options]
        if menu.legal is not None:
            pen = np.where(menu.legal[start:stop], pen, np.inf)
        total += float(pen.min(1).sum())
    return total - lam * (int(budget) - int(fixed_cost))


def smallest_multiplier(run: Callable[[float], tuple[Any, float]], limit: float, start: float, *,
                        stale_growths: int | None = None, steps_from_zero: int = 14, steps: int = 18):
    """The second Lagrange multiplier of a plan under a limit on a separable penalty (time):
    ``run(mu)`` -> (plan, its penalty), the penalty non-increasing in ``mu`` as a
    Lagrangian's is. ``mu`` grows from ``start`` 4x at a time until the limit holds, then is
    bisected (linearly when ``start`` already met it, else in log space, ~1 %) to the
    smallest that does. Returns (plan, mu, penalty); (None, inf, lowest penalty seen) when
    60 growths, or ``stale_growths`` in a row that lower the penalty by under 0.1 %, never
    meet the limit."""
    best, t = run(0.0)
    if t <= limit:
        return best, 0.0, t
    lowest, stale, lo, hi = t, 0, 0.0, start
    for _ in range(60):
        r, t = run(hi)
        if t <= limit:
            best, best_t = r, t
            break
        stale = stale + 1 if t > lowest * 0.999 else 0
        lowest = min(lowest, t)
        if stale_growths is not None and stale >= stale_growths:
            return None, float("inf"), lowest
        lo, hi = hi, hi * 4
    else:
        return None, float("inf"), lowest
    for _ in range(steps_from_zero if lo == 0.0 else steps):
        mid = (lo + hi) / 2 if lo == 0.0 else float(np.sqrt(lo * hi))
        r, t = run(mid)
        if t <= limit:
            hi, best, best_t = mid, r, t
        else:
            lo = mid
    return best, hi, best_t
