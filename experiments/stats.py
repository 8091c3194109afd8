"""Summaries over seeds that every study's report prints the same way."""

from __future__ import annotations

import statistics


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def percent_mean_sd(xs: list[float]) -> str:
    """Fractions as 'mean ± sd' in percent, one decimal."""
    m, sd = mean_sd(xs)
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def margin_kept(student: float, teacher: float, floor: float) -> float:
    """The share of its teacher's lead over a floor (a random init) that a student keeps; nan where the
    teacher has no lead."""
    return (student - floor) / (teacher - floor) if teacher > floor else float("nan")
