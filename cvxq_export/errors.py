"""User-facing errors: one message naming the problem and one naming the fix.

The CLI catches :class:`CvxqError` and prints ``error: <problem>`` and
``fix: <fix>`` without a traceback; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations


class CvxqError(Exception):
    """An error caused by the user's input or environment, with a fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}\n  fix: {self.fix}"


class InfeasibleBudget(CvxqError):
    """The byte budget lies outside what any plan can reach."""

    def __init__(self, budget: int, min_bytes: int, max_bytes: int, unit: str = "bytes") -> None:
        self.budget = budget
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        if budget < min_bytes:
            problem = f"budget {budget:,} {unit} is below the smallest achievable size {min_bytes:,} {unit}"
        else:
            problem = f"budget {budget:,} {unit} is above the largest achievable size {max_bytes:,} {unit}"
        super().__init__(
            problem,
            f"choose a budget between {min_bytes:,} and {max_bytes:,} {unit}",
        )


def missing_extra(module: str, extra: str) -> CvxqError:
    """Error for an optional dependency that is not installed."""
    return CvxqError(
        f"the optional dependency '{module}' is not installed",
        f"pip install 'cvxq-export[{extra}]'",
    )
