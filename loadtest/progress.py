"""Progress bars (rich.progress, on stderr) for the long steps of bench, tune and soak."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:g}/{task.total:g}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)


@contextlib.contextmanager
def steps(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` steps; yields ``step(label)``: call it as each step starts (it advances the
    bar past the previous one and shows the label)."""
    with _progress() as progress:
        task = progress.add_task(description, total=max(total, 1))
        started = 0

        def step(label: str) -> None:
            nonlocal started
            progress.update(task, completed=started, description=f"{description}: {label}")
            started += 1

        yield step
        progress.update(task, completed=total)


@contextlib.contextmanager
def timed(description: str, seconds: float) -> Iterator[None]:
    """A bar that fills over ``seconds`` of wall time: for a step of known length (a Locust run)."""
    done = threading.Event()
    with _progress() as progress:
        task = progress.add_task(description, total=round(seconds))
        t0 = time.monotonic()

        def tick() -> None:
            while not done.wait(0.5):
                progress.update(task, completed=min(round(seconds), round(time.monotonic() - t0)))

        ticker = threading.Thread(target=tick, name="progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
