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

Set ``NEXTACTION_TEST_BROKER_URL=kafka://host:port`` to run the integration tests against a broker
you already run (it is then neither started nor stopped).

Per-test isolation on the shared broker: :func:`app_settings` gives each test its own app id
(consumer group, changelog prefix), topic names, data dir and web port; :func:`app_env` is the
same as environment variables for a worker subprocess.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.ports import free_port, port_free
from stream_app.settings import Settings, SettingsType

TEST_KAFKA_PORT = 19092
TEST_CONTROLLER_PORT = 19093


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACTION_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"NEXTACTION_{name.upper()}"] = str(value)
    return env


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
    checkpoint (safetensors + manifest) in a temp dir; the same arguments give the same path, shared by
    every test that asks for it (a test that changes the files works on a copy)."""
    made: dict[tuple, Path] = {}

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
            made[key] = save_checkpoint(tmp_path_factory.mktemp("checkpoint") / f"s{seed}", model, vocab)
        return made[key]

    return make
