"""One Lagrangian allocator for every menu.

Units (a tensor, or a row group x column group of one) each pick one option
from a menu of (exact cost, distortion) pairs. We minimise total distortion
subject to ``fixed + sum(cost) <= budget``:

1. bisection on the multiplier lambda: every unit independently picks
   ``argmin d + lambda * c`` (which only ever lands on the lower convex hull of
   its menu), and the smallest lambda whose total fits is kept;
2. a greedy fill spends what is left: upgrades along each unit's hull are
   taken in order of distortion saved per extra cost while they fit.

The result never exceeds the budget. The pair (lambda, choice) is the
certificate: at that lambda every unit sits at, or one hull step above, its
Lagrangian optimum.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InfeasibleBudget


@dataclass
class Menu:
    cost: np.ndarray  # [n_units, n_options] int64, exact cost (caller's unit: bits or bytes)
    distortion: np.ndarray  # [n_units, n_options] float64, >= 0
    legal: np.ndarray | None = None  # [n_units, n_options] bool; None = all legal

    def __post_init__(self) -> None:
        if self.cost.shape != self.distortion.shape or self.cost.ndim != 2:
            raise ValueError(f"cost {self.cost.shape} and distortion {self.distortion.shape} must be equal 2-D shapes")
        if self.legal is not None and not self.legal.any(1).all():
            bad = int(np.nonzero(~self.legal.any(1))[0][0])
            raise ValueError(f"unit {bad} has no legal option")

    @property
    def n_units(self) -> int:
        return self.cost.shape[0]

    def masked(self) -> tuple[np.ndarray, np.ndarray]:
        """(cost, distortion) with illegal options at +inf distortion and cost."""
        cost = self.cost.astype(np.float64)
        dist = self.distortion.astype(np.float64)
        if self.legal is not None:
            cost = np.where(self.legal, cost, np.inf)
            dist = np.where(self.legal, dist, np.inf)
        return cost, dist


@dataclass
class Allocation:
    choice: np.ndarray  # [n_units] option index per unit
    lam: float
    cost: int  # total, fixed part included
    distortion: float
    min_cost: int
    max_cost: int
    budget: int

    def to_dict(self) -> dict:
        return {"lam": self.lam, "cost": self.cost, "distortion": self.distortion, "min_cost": self.min_cost,
                "max_cost": self.max_cost, "budget": self.budget}


def cost_range(menu: Menu, fixed_cost: int = 0) -> tuple[int, int]:
    """Smallest and largest achievable totals."""
    if menu.legal is None:
        lo, hi = menu.cost.min(1), menu.cost.max(1)
    else:
        big = np.iinfo(np.int64).max
        lo = np.where(menu.legal, menu.cost, big).min(1)
        hi = np.where(menu.legal, menu.cost, -1).max(1)
    return fixed_cost + int(lo.sum()), fixed_cost + int(hi.sum())


def _lagrangian_choice(cost: np.ndarray, dist: np.ndarray, lam: float) -> np.ndarray:
    """Per unit argmin d + lam c; ties go to the cheaper option. -> [n_units]."""
    with np.errstate(invalid="ignore", over="ignore"):
        obj = dist + lam * cost  # [n, o]
    obj = np.where(np.isfinite(cost), obj, np.inf)  # illegal stays illegal (0 * inf is nan)
    best = obj.min(1, keepdims=True)
    # among (near-)ties pick the lowest cost, so lam -> 0 does not overspend
    tie = obj <= best + 1e-12 * np.abs(best)
    return np.where(tie, cost, np.inf).argmin(1)


def _total(cost_i: np.ndarray, choice: np.ndarray) -> int:
    return int(cost_i[np.arange(len(choice)), choice].sum())


def allocate(menu: Menu, budget: int, fixed_cost: int = 0, *, unit: str = "bytes") -> Allocation:
    """Minimise total distortion subject to ``fixed_cost + total cost <= budget``."""
    lo_cost, hi_cost = cost_range(menu, fixed_cost)
    if not lo_cost <= budget <= hi_cost:
        raise InfeasibleBudget(budget, lo_cost, hi_cost, unit)
    cost, dist = menu.masked()
    cost_i = np.where(np.isfinite(cost), cost, 0).astype(np.int64)
    room = budget - fixed_cost
    # The cheapest plan is always feasible: it is the lam -> inf end.
    min_choice = np.where(np.isfinite(cost), cost, np.inf).argmin(1)

    choice0 = _lagrangian_choice(cost, dist, 0.0)
    if _total(cost_i, choice0) <= room:
        lam, choice = 0.0, choice0
    else:
        # log-space bisection; feasibility is monotone in lam
        lo, hi = -60.0, 60.0  # log10 lam bounds; scaled below to the data
        scale = float(np.nanmax(np.where(np.isfinite(dist), dist, 0))) / max(1.0, float(np.nanmax(cost_i)))
        scale = scale if scale > 0 else 1.0
        best_choice, best_lam = min_choice, np.inf
        for _ in range(80):
            mid = (lo + hi) / 2
            lam_try = scale * 10.0 ** mid
            ch = _lagrangian_choice(cost, dist, lam_try)
            if _total(cost_i, ch) <= room:
                hi, best_choice, best_lam = mid, ch, lam_try
            else:
                lo = mid
            if hi - lo < 1e-4:
                break
        lam, choice = best_lam, best_choice
        if not np.isfinite(lam):
            lam = scale * 10.0 ** hi
    choice = _greedy_fill(cost, dist, cost_i, choice, room)
    total = _total(cost_i, choice)
    assert total <= room, "allocator overspent"  # invariant, not user input
    d = float(dist[np.arange(len(choice)), choice].sum())
    return Allocation(choice, float(lam), fixed_cost + total, d, lo_cost, hi_cost, budget)


def _greedy_fill(cost: np.ndarray, dist: np.ndarray, cost_i: np.ndarray, choice: np.ndarray, room: int,
                 max_rounds: int = 16) -> np.ndarray:
    """Spend the leftover budget on the upgrades with the best distortion saved
    per extra cost, one hull step per unit per round, never overspending."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    spent = _total(cost_i, choice)
    for _ in range(max_rounds):
        left = room - spent
        if left <= 0:
            break
        c_now = cost[rows, choice][:, None]  # [n, 1]
        d_now = dist[rows, choice][:, None]
        with np.errstate(invalid="ignore"):
            dc = cost - c_now  # [n, o]; inf for illegal options
            dd = d_now - dist  # distortion saved
        valid = np.isfinite(dc) & (dc > 0) & (dd > 0) & (dc <= left)
        if not valid.any():
            break
        ratio = np.where(valid, dd / np.where(valid, dc, 1), -np.inf)
        # next hull step: best ratio; among equal ratios the cheapest (finer step)
        best_ratio = ratio.max(1)
        cand = np.nonzero(np.isfinite(best_ratio))[0]
        tie = ratio[cand] >= best_ratio[cand, None] * (1 - 1e-12)
        target = np.where(tie, cost[cand], np.inf).argmin(1)
        step_cost = cost_i[cand, target] - cost_i[cand, choice[cand]]
        order = np.argsort(-best_ratio[cand], kind="stable")
        cand, target, step_cost = cand[order], target[order], step_cost[order]
        # the longest prefix that fits is taken at once; then fit what still fits
        cum = np.cumsum(step_cost)
        k = int(np.searchsorted(cum, left, side="right"))
        choice[cand[:k]] = target[:k]
        left -= int(cum[k - 1]) if k else 0
        changed = k > 0
        smallest = step_cost[k:].min() if k < len(cand) else None
        for i in range(k, len(cand)):
            if smallest is None or left < smallest:
                break
            if step_cost[i] <= left:
                choice[cand[i]] = target[i]
                left -= int(step_cost[i])
                changed = True
        spent = room - left
        if not changed:
            break
    return choice
