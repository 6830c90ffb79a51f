"""stream_app.kafka_security and the security settings: what each protocol hands to aiokafka and to
Faust, the password never shown (repr, the settings table, ``nextaction settings``, the inference
process's settings), yet passed to child processes, and every Kafka client in the code built through
the helper (a check of the sources)."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest

from models.errors import ConfigError
from stream_app.kafka_security import client_kwargs, faust_credentials, ssl_context
from stream_app.settings import KAFKA_AUTH_FIELDS, Settings, settings_env, settings_table

REPO = Path(__file__).resolve().parents[3]
SECRET = "s3cr3t-Pa55word"


def sasl(**kw):
    return Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="nx", kafka_sasl_password=SECRET, **kw)


def test_plaintext_is_the_default_and_needs_nothing():
    s = Settings()
    assert client_kwargs(s) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(s) is None and ssl_context(s) is None


def test_ssl_gives_a_verifying_context():
    s = Settings(kafka_security_protocol="SSL")
    kw = client_kwargs(s)
    assert kw["security_protocol"] == "SSL" and isinstance(kw["ssl_context"], ssl.SSLContext)
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED and kw["ssl_context"].check_hostname
    assert "sasl_plain_password" not in kw
    import faust

    assert isinstance(faust_credentials(s), faust.SSLCredentials)
    assert not Settings(kafka_security_protocol="SSL", kafka_ssl_check_hostname=False).kafka_ssl_check_hostname
    assert not ssl_context(Settings(kafka_security_protocol="SSL", kafka_ssl_check_hostname=False)).check_hostname


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_passes_user_password_mechanism_and_tls(mechanism):
    import faust

    s = sasl(kafka_sasl_mechanism=mechanism)
    kw = client_kwargs(s)
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == mechanism
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("nx", SECRET)
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value, creds.password) == ("SASL_SSL", mechanism, SECRET)
    assert SECRET not in repr(creds)
    plain = client_kwargs(Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="nx",
                                   kafka_sasl_password=SECRET))
    assert "ssl_context" not in plain and plain["sasl_plain_password"] == SECRET


def test_sasl_without_user_or_password_is_refused():
    with pytest.raises(ConfigError, match="needs kafka_sasl_username and kafka_sasl_password"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="nx")
    with pytest.raises(ConfigError, match="needs kafka_sasl_username") as exc:
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_password=SECRET)
    assert SECRET not in str(exc.value) and SECRET not in repr(exc.value.value)  # the error names no secret
    with pytest.raises(ConfigError) as exc:
        Settings(kafka_sasl_password=[SECRET])  # a field error on the password itself
    assert SECRET not in str(exc.value)
    with pytest.raises(ConfigError):
        Settings(kafka_security_protocol="TLS")
    with pytest.raises(ConfigError):
        Settings(kafka_sasl_mechanism="GSSAPI")


def test_the_password_is_never_shown(capsys):
    s = sasl()
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert SECRET not in str(s.model_dump()) and SECRET not in s.model_dump_json()
    assert SECRET not in settings_table()
    from stream_app.cli.common import console
    from stream_app.cli.settings import _show

    with console.capture() as cap:
        _show(s)
    assert "KAFKA_SASL_PASSWORD" in cap.get() and SECRET not in cap.get()


def test_children_get_the_secret_but_the_inference_process_gets_no_credentials():
    s = sasl(kafka_ssl_cafile="/tmp/ca.pem")
    env = settings_env(s)
    assert env["NEXTACTION_KAFKA_SASL_PASSWORD"] == SECRET and env["NEXTACTION_KAFKA_SSL_CAFILE"] == "/tmp/ca.pem"
    assert "NEXTACTION_CHECKPOINT" not in env  # unset stays unset
    back = Settings(**{k.removeprefix("NEXTACTION_").lower(): v for k, v in env.items()})
    assert back.kafka_sasl_password.get_secret_value() == SECRET and back == s
    from stream_app.remote import _Channel

    payload = _Channel(s).payload
    assert not set(KAFKA_AUTH_FIELDS) & set(payload) and SECRET not in str(payload)
    Settings(**payload)  # the child can build its settings without them


# --- every Kafka client goes through stream_app.kafka_security -----------------------------------------
CLIENT = re.compile(r"\b(AIOKafkaProducer|AIOKafkaConsumer|AIOKafkaAdminClient|AIOKafkaClient|faust\.App)\(")


def _call_text(src: str, start: int) -> str:
    depth, i = 0, start
    while True:
        ch = src[i]
        depth += ch == "("
        depth -= ch == ")"
        i += 1
        if ch == ")" and depth == 0:
            return src[start:i]


def test_every_kafka_client_in_the_code_is_built_with_the_security_settings():
    found = []
    for folder in ("stream_app", "online", "benchmarks", "tests", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "test_kafka_security.py":
                continue
            src = path.read_text(encoding="utf-8")
            for m in CLIENT.finditer(src):
                call = _call_text(src, m.end() - 1)
                where = f"{path.relative_to(REPO)}:{src.count(chr(10), 0, m.start()) + 1}"
                found.append(where)
                if m.group(1) == "faust.App":
                    assert "broker_credentials=faust_credentials(" in call, where
                else:
                    assert "client_kwargs(" in call or "**security" in call, \
                        f"{where}: {m.group(1)} built without stream_app.kafka_security.client_kwargs"
    assert len(found) >= 20, found  # the check saw the clients (a renamed import would hide them)
