"""The plan's size-vs-distortion curve, from the allocator's menu.

Every Lagrangian solution of :func:`cvxq_export.allocate.allocate` lies on the
lower convex hull of the achievable (total cost, total distortion) pairs. That
hull is cheap to trace exactly once the per-unit hulls are known: start with
every unit at its cheapest option, then take every unit's hull steps in order
of decreasing slope (distortion saved per extra byte). The running sums of
step costs and savings are the curve's points -- no re-allocation per budget.

The allocator's chosen plan sits on the curve or slightly above it (its greedy
fill may stop one step short in a few units), and the curve at any budget is a
lower bound on the distortion any plan of that size can reach with this menu.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_BUDGET_FACTORS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)


@dataclass
class RDCurve:
    """Size (bytes, as the allocator counts them) vs total sensitivity-weighted distortion."""

    bytes: list[int]  # increasing
    distortion: list[float]  # decreasing
    budget_bytes: int
    chosen_bytes: int | None  # the plan, as the allocator counted it
    chosen_distortion: float | None
    at_budgets: list[dict] = field(default_factory=list)  # {"factor", "bytes", "distortion"} around the budget
    source: str = "menu hull"
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def distortion_at(self, nbytes: float) -> float:
        """The hull's distortion at ``nbytes`` (linear between its points; clamped at the ends)."""
        return float(np.interp(nbytes, self.bytes, self.distortion))


def rd_curve(menu, fixed_bytes: int, budget_bytes: int, *, chosen: np.ndarray | None = None,
             n_points: int = 200, budget_factors=DEFAULT_BUDGET_FACTORS) -> RDCurve:
    """Trace the hull of ``menu`` (an :class:`~cvxq_export.allocate.Menu`, costs in ``menu.unit``).

    Sizes, ``fixed_bytes`` included, are reported in bytes. ``chosen`` ([n_units]
    option index) marks the plan. The curve keeps ``n_points`` points spread evenly
    over its size range.
    """
    from ..allocate import UNIT_BITS, exact_sum, hull_of

    fixed_cost = menu.from_bytes(fixed_bytes)
    hull = hull_of(menu)
    rows = np.arange(menu.n_units)
    first = hull.option[rows, 0].astype(np.intp)  # [n_units] each unit's cheapest hull point
    cost0 = fixed_cost + exact_sum(menu.cost[rows, first])
    dist0 = float(menu.distortion[rows, first].sum())
    real = hull.slope > 0  # [n_units, H-1] steps that lower distortion (padding steps have slope -inf)
    slope = hull.slope[real]
    step_cost = hull.step_cost[real].astype(np.float64)
    order = np.argsort(-slope, kind="stable")  # row-major order keeps each unit's chain order on ties
    cum_cost = np.concatenate([[0.0], np.cumsum(step_cost[order])])
    cum_gain = np.concatenate([[0.0], np.cumsum((slope * step_cost)[order])])
    unit = 8.0 / UNIT_BITS[menu.unit]  # costs per byte
    x = (cost0 + cum_cost) / unit  # bytes
    y = dist0 - cum_gain
    y = np.maximum(y, 0.0)  # rounding in the running sum must not go below zero
    grid = np.linspace(x[0], x[-1], max(2, n_points)) if x[-1] > x[0] else x[:1]
    ys = np.interp(grid, x, y)
    chosen_bytes = chosen_dist = None
    if chosen is not None:
        chosen = np.asarray(chosen, dtype=np.intp)
        chosen_bytes = int(np.ceil((fixed_cost + exact_sum(menu.cost[rows, chosen])) / unit))
        chosen_dist = float(menu.distortion[rows, chosen].sum())
    at = []
    for f in budget_factors:
        b = budget_bytes * f
        if x[0] <= b <= x[-1]:
            at.append({"factor": f, "bytes": int(b), "distortion": float(np.interp(b, x, y))})
    return RDCurve([int(round(v)) for v in grid], [float(v) for v in ys], int(budget_bytes), chosen_bytes, chosen_dist,
                   at, note="lower convex hull of the menu: the allocator's Lagrangian frontier; sizes as the "
                            "allocator counts them (fixed bytes and padding allowance included)")


def native_choice(plan, native_menu) -> np.ndarray:
    """The option index per unit of a native plan (from its unit maps), in the menu's unit order."""
    from ..native import encode_map

    opts = native_menu.options
    code_to_option = {}
    for i, (b, k) in enumerate(opts):
        code = int(encode_map(np.array([b]), np.array([k]))[0])
        code_to_option.setdefault(code, i)
    lut = np.full(256, -1, dtype=np.intp)
    for code, i in code_to_option.items():
        lut[code] = i
    lut[0x10] = lut[0x00]  # zero bits with the kind bit set is still the zero-bit option
    out = np.empty(native_menu.menu.n_units, dtype=np.intp)
    for t in native_menu.tensors:
        tp = plan.tensor(t.ref.name)
        out[t.start : t.start + t.n_units] = lut[np.asarray(tp.unit_map, dtype=np.uint8)]
    if (out < 0).any():
        raise ValueError("the plan's unit maps hold options the menu does not have")
    return out


def native_rd_curve(plan, native_menu, **kw) -> RDCurve:
    """:func:`rd_curve` of a native / packed plan and the menu it was allocated from."""
    return rd_curve(native_menu.menu, plan.fixed_bytes, plan.budget_bytes, chosen=native_choice(plan, native_menu), **kw)
