"""What every benchmark shares: where results go, how a run describes itself, and how it writes them.

* :data:`ROOT`, :data:`RESULTS` (``benchmarks/RESULTS.md``), :data:`TAOBAO_SLICE` (the Taobao time slice);
* :func:`machine` and :func:`loadavg`: the machine line of a report (numbers are comparable only
  within one run on a shared box, so every report says where and under what load it ran);
* :func:`command_line`: the exact command that produced a report;
* :func:`write_section` / :func:`publish`: put one script's block into ``RESULTS.md`` between
  ``<!-- BEGIN name -->`` and ``<!-- END name -->``, leaving every other block as it was;
* :class:`BenchError`: a benchmark step failed.

Scripts run as ``python benchmarks/<script>.py`` put the repository root on ``sys.path`` before
importing this module (``python -m benchmarks.<script>`` needs nothing).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from models.datasets.core import datasets_root

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TAOBAO_SLICE = datasets_root() / "taobao-userbehavior-timeslice" / "UserBehavior.csv"
#: What a new RESULTS.md starts with.
RESULTS_HEADER = ("# Benchmark results\n\nEach section is written by its script (see `benchmarks/README.md`); "
                  "edit the scripts, not the generated blocks.\n")


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


# ------------------------------------------------------------------------------------------------ #
# the machine
# ------------------------------------------------------------------------------------------------ #

def loadavg(fmt: str = "{:.2f} {:.2f} {:.2f}") -> str:
    """The 1/5/15-minute load average, formatted with ``fmt``; ``?`` where the OS does not say.

    >>> loadavg("{:.0f}|{:.0f}|{:.0f}").count("|") in (0, 2)
    True
    """
    try:
        return fmt.format(*os.getloadavg())
    except OSError:
        return "?"


def cpu_model() -> str:
    """The CPU model name (``lscpu``, else ``/proc/cpuinfo``, else :func:`platform.processor`)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine(device: Any = None) -> str:
    """One line: CPU model, cores, memory, load average; with ``device`` (a torch device or its name:
    the benchmark runs torch in this process) torch's version and intra-op threads; and the GPU the
    benchmark measured on (``GPU: none`` where it ran on the CPU only).

    >>> line = machine()
    >>> "cores available" in line and "load average" in line and line.endswith("GPU: none")
    True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    of = f" (of {os.cpu_count()})" if os.cpu_count() not in (None, cores) else ""
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f}"
    except (ValueError, OSError):
        mem = "?"
    line = (f"CPU `{cpu_model()}`, {cores} cores available{of}, {mem} GiB RAM, "
            f"load average {loadavg('{:.1f}/{:.1f}/{:.1f}')} (1/5/15 min)")
    gpu = "none"
    if device is not None:
        import torch

        device = torch.device(device)
        line += f", torch {torch.__version__} with {torch.get_num_threads()} intra-op threads"
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
    return f"{line}; GPU: {gpu}"


# ------------------------------------------------------------------------------------------------ #
# the command
# ------------------------------------------------------------------------------------------------ #

def command_line(argv: list[str] | None = None) -> str:
    """The command that runs this benchmark again, from the repository root: the interpreter (relative
    to the root when it lives there, e.g. ``.venv/bin/python``), the script or ``-m module``, and its
    arguments (``argv``, default ``sys.argv[1:]``), shell-quoted."""
    exe = sys.executable
    exe = os.path.relpath(exe, ROOT) if exe.startswith(str(ROOT) + os.sep) else exe
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = ["-m", spec.name] if spec is not None and spec.name else [os.path.relpath(os.path.abspath(sys.argv[0]),
                                                                                       ROOT)]
    return " ".join(shlex.quote(x) for x in [exe, *script, *(sys.argv[1:] if argv is None else argv)])


# ------------------------------------------------------------------------------------------------ #
# RESULTS.md
# ------------------------------------------------------------------------------------------------ #

def _unmarked_section(lines: list[str], heading: str) -> tuple[int, int] | None:
    """Lines ``[start, end)`` of a section written before the markers: from the line ``heading`` to the
    next ``## `` heading or marked block."""
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading.strip()), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(("## ", "<!-- BEGIN "))), len(lines))
    return start, end


def write_section(name: str, markdown: str, path: Path = RESULTS, *, heading: str | None = None) -> None:
    """Put ``markdown`` into ``path`` between ``<!-- BEGIN name -->`` and ``<!-- END name -->``,
    leaving every other section as it was.

    Where the markers are missing: a section that starts with ``markdown``'s own ``#`` heading line
    (written before the markers existed) is replaced, up to the next ``## `` heading; else the block
    is appended, after ``heading`` when given. The file is replaced atomically.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "R.md"
    >>> _ = p.write_text("# R\\n\\n## Quality\\nold\\n\\n## Other\\nkept\\n")
    >>> write_section("quality", "## Quality\\nnew", p)
    >>> write_section("x", "x1", p, heading="## X")
    >>> write_section("x", "x2\\n", p, heading="## X")
    >>> print(p.read_text())
    # R
    <BLANKLINE>
    <!-- BEGIN quality -->
    ## Quality
    new
    <!-- END quality -->
    <BLANKLINE>
    ## Other
    kept
    <BLANKLINE>
    ## X
    <BLANKLINE>
    <!-- BEGIN x -->
    x2
    <!-- END x -->
    <BLANKLINE>
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    first = markdown.lstrip("\n").split("\n", 1)[0]
    lines = text.splitlines(keepends=True)
    if begin in text and end in text and text.index(begin) < text.index(end):
        a, b = text.index(begin), text.index(end) + len(end)
        if b < len(text) and text[b] == "\n":
            b += 1
        text = text[:a] + block + text[b:]
    elif first.startswith("#") and (span := _unmarked_section(lines, first)) is not None:
        rest = "".join(lines[span[1]:])
        text = "".join(lines[:span[0]]) + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block
    tmp = path.with_suffix(f".md.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(section: str, text: str, *, write: bool, path: Path = RESULTS, heading: str | None = None) -> None:
    """Print a results section and, if ``write``, put it into RESULTS.md (:func:`write_section`)."""
    print(text)
    if write:
        write_section(section, text, path, heading=heading)
        print(f"wrote section {section!r} of {path}")


def taobao_stream(path: Path, n: int, max_events: int) -> list[tuple[str, Any, dict]]:
    """(user, window as of the event, the event) for the first ``n`` events of a Taobao CSV in file
    order, each window extended exactly as the stream does (``stream_app.history.add_event``)."""
    import itertools

    from models.schema import EventSeq
    from stream_app.history import add_event
    from stream_app.replay import taobao_csv

    hist: dict[str, EventSeq] = {}
    out = []
    for ev in itertools.islice(taobao_csv(path), n):
        h = add_event(hist.get(ev["user_id"], EventSeq.empty()), ev["item_id"], ev["action"], ev["ts"],
                      max_events=max_events, ttl_ms=7 * 86_400_000, category=ev.get("category", ""))
        hist[ev["user_id"]] = h
        out.append((ev["user_id"], h, ev))
    return out
