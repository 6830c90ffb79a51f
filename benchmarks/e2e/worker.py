"""The ``faust worker`` subprocess of the end-to-end benchmark: started with the settings of one run
(environment ``NEXTACTION_*``, its own app id, topics, data dir and web port), profiled on request
(pyinstrument from the start, or py-spy attached in steady state), stopped gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from benchmarks.common import BenchError
from stream_app.cli.stream import worker_argv  # the one place that names the Faust app spec
from stream_app.settings import SettingsType

log = logging.getLogger("e2e")


def settings_env(settings: SettingsType, extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without NEXTACTION_*, plus the variables that reproduce ``settings`` in a subprocess."""
    from stream_app.settings import settings_env as nextaction_env  # secrets revealed for the child only

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACTION_")}
    env.update(nextaction_env(settings))
    env.update(extra or {})
    return env


def tail_file(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no file {path})"


class Worker:
    """A ``faust worker`` subprocess in its own process group, with its log in a file."""

    def __init__(self, settings: SettingsType, log_path: Path, *, extra_env: dict[str, str], cwd: Path,
                 profile: Path | None = None, profiler: str = "pyinstrument", loglevel: str = "info",
                 app: str | None = None) -> None:
        self.settings, self.log_path, self.cwd = settings, log_path, cwd
        # NB: Faust's `-l warn`/`-l error` keep its terminal spinner, which sets the ROOT logger to DEBUG:
        # every log.debug() in aiokafka/faust/mode then builds a LogRecord (findCaller...). `info` does not.
        argv = worker_argv(settings, loglevel, settings.web_port)
        if app is not None:  # another Faust app (benchmarks/e2e/faust_floor.py), same command line
            argv[argv.index("-A") + 1] = app
        if profile is not None:
            if profiler == "pyinstrument":
                # python -m faust ... -> python -m pyinstrument -o FILE -r text -m faust ...
                assert argv[1:3] == ["-m", "faust"], argv
                argv = [argv[0], "-m", "pyinstrument", "-o", str(profile), "-r", "pyisession", "-i", "0.002",
                        *argv[1:]]
            # py-spy attaches later (see attach_profiler): steady state only, all threads.
        self.argv = argv
        self.env = settings_env(settings, extra_env)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.profile, self.profiler = profile, profiler
        self.spy: subprocess.Popen | None = None

    def attach_profiler(self) -> None:
        """py-spy: sample the running worker (all threads, on-CPU only) until :meth:`detach_profiler`."""
        if self.profile is None or self.profiler != "py-spy" or self.proc is None:
            return
        spy = shutil.which("py-spy") or os.environ.get("PY_SPY", "")
        if not spy or not Path(spy).exists():
            raise BenchError("--profiler py-spy: py-spy not found on PATH or in $PY_SPY")
        self.spy = subprocess.Popen([spy, "record", "--pid", str(self.proc.pid), "--threads", "--subprocesses", "-r", "100",
                                     "-f", "raw", "-o", str(self.profile) + ".raw"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def detach_profiler(self) -> None:
        if self.spy is None:
            return
        if self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(60)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait(10)
        self.spy = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the worker exited with status {self.proc.returncode}; last lines of "
                             f"{self.log_path}:\n{tail_file(self.log_path)}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the group (graceful: Faust drains and commits), SIGKILL after ``timeout``."""
        self.detach_profiler()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop within %.0f s after SIGTERM: SIGKILL", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        # Anything left in the group (e.g. a profiler's child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

