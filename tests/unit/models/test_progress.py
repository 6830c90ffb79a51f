"""models.progress: a tqdm bar on a terminal (a real pseudo-terminal here), plain periodic lines in a
file or a pipe, nothing when disabled; the replay and the trainer's epochs use it."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
from pathlib import Path

from models.progress import PlainProgress, interactive, progress

REPO = Path(__file__).resolve().parents[3]


class Clock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_plain_lines_every_few_seconds_and_one_at_the_end():
    out = io.StringIO()
    bar = progress(range(100), desc="train", unit="batch", stream=out, every_s=10.0, clock=Clock(1.0))
    assert isinstance(bar, PlainProgress) and bar.total == 100
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10  # one per 10 s of 100 s, and the last one
    assert lines[0].startswith("train: 10/100 batch (10%), ")
    assert lines[-1] == "train: 100/100 batch (100%) in 101.0 s, 1.0 batch/s, loss=0.01"  # clock: 1 s a call


def test_disabled_or_not_left_writes_no_final_line():
    out = io.StringIO()
    with progress(total=5, stream=out, enabled=False, clock=Clock(100.0)) as bar:
        bar.update(5)
    assert out.getvalue() == ""
    with progress(total=5, stream=out, leave=False, every_s=1e9, clock=Clock(1.0)) as bar:
        bar.update(5)
    assert out.getvalue() == ""


def test_on_a_terminal_it_is_a_tqdm_bar():
    from tqdm import tqdm

    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert interactive(tty) and not interactive(io.StringIO())
            bar = progress(range(3), desc="x", stream=tty)
            assert isinstance(bar, tqdm)
            list(bar)
            tty.flush()
        # A pty read returns what has arrived so far (tqdm writes each redraw on its own): read until the
        # final frame is there or nothing more comes.
        drawn = b""
        while b"3/3" not in drawn and select.select([master], [], [], 5.0)[0]:
            drawn += os.read(master, 4096)
        assert b"\r" in drawn and b"3/3" in drawn
    finally:
        os.close(master)
        os.close(slave)


def test_a_pipe_gets_lines_not_carriage_returns():
    """What a log file or CI sees: the helper in a real process whose stderr is a pipe."""
    code = ("from models.progress import progress\n"
            "import time\n"
            "bar = progress(total=4, desc='-> events', unit='ev', every_s=0.05)\n"
            "for _ in range(4):\n"
            "    time.sleep(0.06); bar.update(1)\n"
            "bar.close()\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) >= 3 and lines[-1].startswith("-> events: 4/4 ev (100%) in ")
