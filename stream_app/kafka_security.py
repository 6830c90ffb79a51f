"""How every Kafka client of the product authenticates: one place turns the ``kafka_*`` security
settings (:mod:`stream_app.settings`) into

- :func:`client_kwargs`: the keyword arguments of a plain aiokafka client (``AIOKafkaProducer``,
  ``AIOKafkaConsumer``, ``AIOKafkaAdminClient``, ``AIOKafkaClient``), and
- :func:`faust_credentials`: the Faust app's ``broker_credentials``.

Every client in the code is built with one of them (``tests/unit/stream_app/test_kafka_security.py``
checks the sources). The password is a pydantic ``SecretStr`` until this module hands it to the
client; nothing here logs it.

>>> from stream_app.settings import Settings
>>> client_kwargs(Settings())
{'security_protocol': 'PLAINTEXT'}
>>> kw = client_kwargs(Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u",
...                             kafka_sasl_password="p", kafka_sasl_mechanism="SCRAM-SHA-256"))
>>> kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]
('SASL_PLAINTEXT', 'SCRAM-SHA-256', 'u', 'p')
"""

from __future__ import annotations

import ssl
from typing import Any

from stream_app.settings import SettingsType


def ssl_context(settings: SettingsType) -> ssl.SSLContext | None:
    """The TLS context of ``SSL`` / ``SASL_SSL`` (``None`` otherwise): the system's CAs or
    ``kafka_ssl_cafile``, a client certificate when ``kafka_ssl_certfile`` is set, hostname checks
    unless ``kafka_ssl_check_hostname`` is off."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    cafile = settings.kafka_ssl_cafile
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(cafile.expanduser()) if cafile is not None else None)
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile is not None:
        key = settings.kafka_ssl_keyfile
        ctx.load_cert_chain(str(settings.kafka_ssl_certfile.expanduser()),
                            str(key.expanduser()) if key is not None else None)
    return ctx


def client_kwargs(settings: SettingsType) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client: ``security_protocol``, and as the protocol needs
    ``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``."""
    protocol = settings.kafka_security_protocol
    kw: dict[str, Any] = {"security_protocol": protocol}
    ctx = ssl_context(settings)
    if ctx is not None:
        kw["ssl_context"] = ctx
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        kw.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                  sasl_plain_password=password.get_secret_value() if password is not None else None)
    return kw


def faust_credentials(settings: SettingsType) -> Any:
    """The Faust app's ``broker_credentials`` (``None`` for ``PLAINTEXT``): ``faust.SSLCredentials``
    for ``SSL``, ``faust.SASLCredentials`` (with the TLS context for ``SASL_SSL``) for ``SASL_*``.
    Faust passes them to every consumer, producer and admin client it builds."""
    import faust  # noqa: PLC0415 - only the worker needs Faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ctx = ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(ctx)
    password = settings.kafka_sasl_password
    return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                 password=password.get_secret_value() if password is not None else None,
                                 ssl_context=ctx, mechanism=settings.kafka_sasl_mechanism)
