"""The stderr console every workflow reports on (progress bars, notes); the CLI prints on the same one."""

from rich.console import Console

#: stderr: stdout stays free for what a command returns (JSON metrics)
console = Console(stderr=True)


def maps_progress(label: str, *before_bar):
    """A progress bar counting maps on the console: ``label``, the columns ``before_bar``, the bar, done/total,
    elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{label}"), *before_bar, BarColumn(), MofNCompleteColumn(), TextColumn("maps"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)
