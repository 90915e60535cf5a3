"""Local search for a plan under two limits: bytes and a second separable cost (time).

The allocator (:mod:`.allocate`) is exact for one limit. A second limit is priced by a
second Lagrange multiplier (``allocate.smallest_multiplier``), and with one option per
unit the Lagrangian solution jumps as that multiplier moves: at the critical value many
units switch at once, so the plan just under the time limit can sit far under it and
under the byte budget too (a 93.5 MB GGUF plan stopped at 88.9 MB with 4x the
distortion of a plan 2 % slower). The classical remedy is to walk from the Lagrangian
points by single-unit moves:

* **repair** a plan that is over the time limit: take, one at a time, the move that
  saves time for the least distortion added per microsecond saved (bytes permitting);
* **fill** the slack of a plan under both limits: take, one at a time, the move that
  lowers distortion the most per share of the remaining time and bytes it uses (moves
  that use neither come first).

Both only ever keep the plan within the byte cap, and fill keeps it within the time cap,
so the result of :func:`polish` is feasible or ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .allocate import Allocation, Menu, allocate, smallest_multiplier


def _deltas(m: Menu, times: np.ndarray, choice: np.ndarray):
    """[n_units, n_options] changes of distortion, time and bytes for moving each unit
    from its current option to each other option."""
    rows = np.arange(len(choice))
    dd = m.distortion - m.distortion[rows, choice][:, None]
    dt = times - times[rows, choice][:, None]
    db = m.cost - m.cost[rows, choice][:, None]
    return dd, dt, db


def repair(m: Menu, choice: np.ndarray, times: np.ndarray, time_cap: float, bytes_cap: int) -> np.ndarray | None:
    """Move units to faster options until ``sum(times) <= time_cap`` (the least distortion
    added per microsecond saved first, bytes kept within ``bytes_cap``); None when no
    single move saves time any more."""
    legal = m.legal if m.legal is not None else np.ones(m.cost.shape, dtype=bool)
    rows = np.arange(len(choice))
    choice = choice.copy()
    time_used = float(times[rows, choice].sum())
    bytes_left = bytes_cap - int(m.cost[rows, choice].sum())
    while time_used > time_cap:
        dd, dt, db = _deltas(m, times, choice)
        ok = legal & (dt < 0) & (db <= bytes_left)
        if not ok.any():
            return None
        # a move that also lowers distortion scores below every other (negative)
        score = np.where(ok, dd / -np.where(ok, dt, -1.0), np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        time_used += float(dt[i, j])
        bytes_left -= int(db[i, j])
        choice[i] = j
    return choice


def fill(m: Menu, choice: np.ndarray, times: np.ndarray, time_cap: float, bytes_cap: int) -> np.ndarray:
    """Lower distortion by single moves that keep both limits; returns the new choice."""
    legal = m.legal if m.legal is not None else np.ones(m.cost.shape, dtype=bool)
    rows = np.arange(len(choice))
    choice = choice.copy()
    time_left = time_cap - float(times[rows, choice].sum())
    bytes_left = bytes_cap - int(m.cost[rows, choice].sum())
    while True:
        dd, dt, db = _deltas(m, times, choice)
        ok = legal & (dd < 0) & (dt <= time_left) & (db <= bytes_left)
        if not ok.any():
            return choice
        # share of what is left that the move uses; a move using neither resource is free
        use = np.maximum(dt, 0) / max(time_left, 1e-12) + np.maximum(db, 0) / max(bytes_left, 1)
        free = ok & (use <= 0)
        if free.any():
            score = np.where(free, -dd, -np.inf)
        else:
            score = np.where(ok, -dd / np.maximum(use, 1e-12), -np.inf)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        time_left -= float(dt[i, j])
        bytes_left -= int(db[i, j])
        choice[i] = j


def polish(m: Menu, choice: np.ndarray, times: np.ndarray, time_cap: float, bytes_cap: int) -> np.ndarray | None:
    """Repair ``choice`` to the time cap if it is over, then fill the slack left.

    m: the menu (costs in the unit of ``bytes_cap``); times: [n_units, n_options] the
    second cost; choice: [n_units] option per unit, within ``bytes_cap``."""
    fixed = repair(m, choice, times, time_cap, bytes_cap)
    return None if fixed is None else fill(m, fixed, times, time_cap, bytes_cap)


def best_polished(m: Menu, candidates: list[np.ndarray], times: np.ndarray, time_cap: float,
                  bytes_cap: int) -> tuple[np.ndarray | None, int]:
    """The lowest-distortion feasible plan over the polished ``candidates`` (the
    Lagrangian points a multiplier search visited) and the index of the one it came from."""
    rows = None
    best, best_d, best_k = None, np.inf, -1
    for k, c in enumerate(candidates):
        p = polish(m, c, times, time_cap, bytes_cap)
        if p is None:
            continue
        rows = np.arange(len(p)) if rows is None else rows
        d = float(m.distortion[rows, p].sum())
        if d < best_d:
            best, best_d, best_k = p, d, k
    return best, best_k


def lagrangian_scales(m: Menu, times: np.ndarray) -> tuple[float, float]:
    """(distortion, time) scales of a menu: the medians of its positive legal entries (1
    where none is positive). They set the time multiplier's starting point and keep the
    fastest plan's distortion tie-break negligible."""
    legal = m.legal if m.legal is not None else np.ones(m.cost.shape, dtype=bool)
    d, t = m.distortion[legal], times[legal]
    return (float(np.median(d[d > 0])) if (d > 0).any() else 1.0,
            float(np.median(t[t > 0])) if (t > 0).any() else 1.0)


def fastest_plan(m: Menu, times: np.ndarray, budget: int, fixed: int = 0, *, unit: str | None = None,
                 scales: tuple[float, float] | None = None) -> Allocation:
    """The fastest plan within ``budget``: time alone, distortion only breaking ties.
    Raises :class:`~cvxq_export.errors.InfeasibleBudget` when no plan fits."""
    d_scale, t_scale = scales or lagrangian_scales(m, times)
    return allocate(m.with_costs(distortion=times / t_scale + 1e-9 * m.distortion / d_scale), budget, fixed, unit=unit)


@dataclass
class TwoLimitPlan:
    choice: np.ndarray | None  # [n_units] option per unit within both limits; None: none found
    lam: float  # byte multiplier of the Lagrangian point it was polished from
    mu: float  # time multiplier of that point (inf: the fastest plan)
    fastest: Allocation  # the fastest plan of the menu at the budget (time alone)


def search_two_limits(m: Menu, times: np.ndarray, time_cap: float, budget: int, fixed: int = 0, *,
                      unit: str | None = None, scales: tuple[float, float] | None = None,
                      stale_growths: int | None = None, steps_from_zero: int = 14) -> TwoLimitPlan:
    """The least-distortion plan found within ``budget`` (``fixed`` + costs) and
    ``sum(times) <= time_cap``: the fastest plan (:func:`fastest_plan`), then distortion +
    mu x time with mu grown and bisected to the smallest that meets the cap
    (``allocate.smallest_multiplier``), then every point visited polished. ``choice`` is
    None when no polished point meets the cap. ``scales``: :func:`lagrangian_scales`
    (computed here when not given).

    Raises :class:`~cvxq_export.errors.InfeasibleBudget` when no plan fits ``budget``."""
    d_scale, t_scale = scales or lagrangian_scales(m, times)
    rows = np.arange(m.cost.shape[0])
    fastest = fastest_plan(m, times, budget, fixed, unit=unit, scales=(d_scale, t_scale))
    visited = [(fastest, float("inf"))]

    def run(mu: float):
        alloc = allocate(m.with_costs(distortion=m.distortion + mu * times), budget, fixed, unit=unit)
        visited.append((alloc, mu))
        return alloc, float(times[rows, alloc.choice].sum())

    smallest_multiplier(run, time_cap, d_scale / t_scale, stale_growths=stale_growths, steps_from_zero=steps_from_zero)
    # one option per unit makes the Lagrangian jump (many units switch at one mu): the point
    # just under the cap can sit far under both limits; single moves from every point visited
    # (repair those over the cap, fill the slack) find better plans between them
    choice, k = best_polished(m, [a.choice for a, _ in visited], times, time_cap, budget - fixed)
    if choice is None:
        return TwoLimitPlan(None, float("nan"), float("inf"), fastest)
    return TwoLimitPlan(choice, visited[k][0].lam, visited[k][1], fastest)
