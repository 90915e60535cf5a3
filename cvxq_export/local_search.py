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

import numpy as np

from .allocate import Menu


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
