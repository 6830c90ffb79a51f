"""stream_app.kafka_admin against the real broker: topics are created once with their partitions, and
an unreachable broker is named."""

from __future__ import annotations

import socket

import pytest

from stream_app import kafka_admin
from stream_app.errors import BrokerError
from stream_app.settings import Settings

pytestmark = pytest.mark.integration


def test_ensure_topics_creates_missing_with_partitions(app_settings):
    counts = kafka_admin.ensure_topics(app_settings, partitions=3)
    assert counts == {t: 3 for t in kafka_admin.app_topics(app_settings)}
    # Existing topics are left alone (and reported with their real partition count).
    again = kafka_admin.ensure_topics(app_settings, partitions=5)
    assert again == counts
    other = kafka_admin.ensure_topics(app_settings, [f"{app_settings.app_id}.extra"])
    assert other == {f"{app_settings.app_id}.extra": app_settings.partitions}


def test_ensure_topics_names_an_unreachable_broker(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        settings = Settings(broker_url=f"kafka://127.0.0.1:{port}", data_dir=tmp_path)
        with pytest.raises(BrokerError, match=rf"cannot reach Kafka at 127\.0\.0\.1:{port}"):
            kafka_admin.ensure_topics(settings, timeout=5)
