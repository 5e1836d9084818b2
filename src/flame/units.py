"""Human-readable sizes and durations for summary lines: the one formatter of each."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1000 B), as disks and `df -H` count: "1,234 B", "5.1 MB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def human_time(seconds: float) -> str:
    """Seconds under two minutes, minutes under two hours, then hours: "42.0 s", "3.5 min"."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
