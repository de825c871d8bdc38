"""Progress on stderr: a rich bar with steps/s and ETA, silent with --quiet or when stderr is not a TTY."""

from __future__ import annotations

import sys


class Progress:
    """A rich progress bar on stderr (steps/s and ETA); silent with --quiet or when stderr is not a TTY
    unless LATENTGEN_PROGRESS=1."""

    def __init__(self, total: int, label: str, quiet: bool):
        import os

        self.bar = None
        if quiet or not (sys.stderr.isatty() or os.environ.get("LATENTGEN_PROGRESS") == "1"):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RP

        self.bar = RP(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            SpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def __call__(self, info: dict) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def SpeedColumn():
    """A rich column: steps per second (seconds per step when slower than one a second)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class _Speed(ProgressColumn):
        def render(self, task) -> Text:
            v = task.finished_speed or task.speed
            if not v:
                return Text("- step/s")
            return Text(f"{v:.2f} step/s" if v >= 1 else f"{1 / v:.2f} s/step")

    return _Speed()
