"""Progress bars (tqdm on stderr) and stage logging."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("advcam")


def progress(iterable: Iterable[T] | None, desc: str, total: int | None = None, unit: str = "it") -> "tqdm[T]":
    """A progress bar (a tqdm iterator: ``set_postfix`` works) for a loop a user waits for.

    ``ADVCAM_PROGRESS=0`` turns the bars off. Plain tqdm, not ``tqdm.auto``, whose asyncio variant opens an
    iterator on ``iterable`` when the bar is made and another when the loop starts: a DataLoader with workers
    started its worker processes twice."""
    disable = os.environ.get("ADVCAM_PROGRESS", "1") == "0" or launch_rank() != 0  # under torchrun, rank 0's bar only
    # into a log file (Snakemake's logs/, a SLURM job's output) a refresh every 10 s, not twice a second
    interval = 0.5 if sys.stderr.isatty() else 10.0
    return (tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=disable,
                 dynamic_ncols=True, mininterval=interval))


def note(bar: "tqdm[Any]", text: str) -> None:
    """Show ``text`` after the bar's counts (its postfix) now, within the bar's refresh interval: for work inside
    one long step (an AdvCAM scale on a CPU), which no ``update`` would show until the step ends. A log file
    still gets at most one line per interval."""
    bar.set_postfix_str(text, refresh=False)
    if not bar.disable and time.time() - bar.last_print_t >= bar.mininterval:
        bar.refresh()


def launch_rank() -> int:
    """This process's rank as torchrun started it (``RANK``; 0 outside torchrun), also after the process group
    is gone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def setup_logging(debug: bool = False) -> None:
    """advcam's log lines on stderr; under torchrun the other processes log warnings and errors only, so each
    line appears once."""
    quiet = launch_rank() != 0 and not debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO,
                        format="[advcam %(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for chatty in ("matplotlib", "PIL"):  # --debug is for advcam's lines: their font and plugin searches flood it
        logging.getLogger(chatty).setLevel(logging.INFO)
