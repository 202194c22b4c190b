"""Helpers of the tests that start processes and watch them end."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """True while process ``pid`` runs: it exists in /proc and is not a zombie waiting to be reaped (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"
