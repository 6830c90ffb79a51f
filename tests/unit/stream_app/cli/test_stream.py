"""stream_app.cli.stream: ``worker``, ``replay taobao|csv|synthetic`` and ``tail`` — argument parsing and
errors, with no broker (replay/produce and exec are faked; ``cli`` and ``fake_replay`` are in conftest.py)."""

from __future__ import annotations

import sys

import pytest
import typer

from stream_app.cli import stream as cli_stream
from stream_app.ports import free_port


# --- mapping ---------------------------------------------------------------------------------- #

def test_parse_mapping_accepts_commas_and_repeats():
    got = cli_stream.parse_mapping(["user_id=visitorid, item_id=itemid", "action=event", "ts=timestamp,price=p"])
    assert got == {"user_id": "visitorid", "item_id": "itemid", "action": "event", "ts": "timestamp", "price": "p"}


@pytest.mark.parametrize("value, message", [
    ("user_id=a,item_id=b,action=c,ts", "'ts' is not FIELD=COLUMN"),
    ("user_id=a,item_id=b,action=c,ts=", "'ts=' is not FIELD=COLUMN"),
    ("user_id=a,item_id=b,action=c,ts=d,colour=e", "unknown event field 'colour'"),
    ("user_id=a,item_id=b,action=c,ts=d,user_id=z", "field 'user_id' mapped twice ('a' and 'z')"),
    ("user_id=a,action=c", "missing item_id, ts"),
])
def test_parse_mapping_names_the_bad_value(value, message):
    with pytest.raises(typer.BadParameter, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli_stream.parse_mapping([value])


# --- replay ----------------------------------------------------------------------------------- #

def test_replay_synthetic_passes_options(cli, fake_replay):
    res = cli("replay", "synthetic", "--events", "7", "--users", "3", "--seed", "5", "--rate", "250",
              "--no-progress")
    assert res.exit_code == 0, res.output
    assert fake_replay["synthetic"] == (7, 3, 5) and fake_replay["n_items"] is None  # the generator's default
    topic, rate, progress, events = fake_replay["produce"]
    assert (topic, rate, progress, len(events)) == ("events", 250.0, False, 7)
    assert "sent 7 events to events" in res.output


def test_replay_synthetic_items_sets_the_catalogue(cli, fake_replay):
    assert cli("replay", "synthetic", "-n", "2", "--items", "60").exit_code == 0
    assert fake_replay["n_items"] == 60


def test_replay_default_rate_is_as_fast_as_possible(cli, fake_replay):
    assert cli("replay", "synthetic", "-n", "2").exit_code == 0
    assert fake_replay["produce"][1] is None


def test_replay_taobao_limit_and_rebase(cli, fake_replay, tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,2,3,pv,1511544070\n")
    res = cli("replay", "taobao", str(path), "--limit", "3", "--rebase-time")
    assert res.exit_code == 0, res.output
    assert fake_replay["taobao"] == (str(path), True)
    assert len(fake_replay["produce"][3]) == 3


def test_replay_csv_mapping_and_seconds(cli, fake_replay, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,sku,type,time\n")
    res = cli("replay", "csv", str(path), "--map", "user_id=uid,item_id=sku", "--map", "action=type,ts=time",
              "--ts-unit", "s")
    assert res.exit_code == 0, res.output
    assert fake_replay["csv"] == (str(path), {"user_id": "uid", "item_id": "sku", "action": "type", "ts": "time"},
                                  False, "s")
    assert len(fake_replay["produce"][3]) == 1


def test_replay_csv_default_ts_unit_is_ms(cli, fake_replay, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,sku,type,time\n")
    assert cli("replay", "csv", str(path), "-m", "user_id=uid,item_id=sku,action=type,ts=time").exit_code == 0
    assert fake_replay["csv"][3] == "ms"


def test_csv_bad_mapping_and_ts_unit(cli, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("a,b\n")
    res = cli("replay", "csv", str(path), "--map", "user_id=a,wat=b")
    assert res.exit_code == 2 and "unknown event field 'wat'" in cli.flat(res.output)
    res = cli("replay", "csv", str(path), "--map", "user_id=a,item_id=b,action=c,ts=d", "--ts-unit", "h")
    assert res.exit_code == 2 and "'h' is not one of" in cli.flat(res.output)


def test_replay_csv_through_the_real_csv_reader(cli, monkeypatch, tmp_path):
    """The CLI and stream_app.replay agree on generic_csv's signature (only produce is faked)."""
    from stream_app import replay

    sent = {}

    async def produce(settings, events, rate, progress):
        sent["events"] = list(events)
        return len(sent["events"])

    monkeypatch.setattr(replay, "produce", produce)
    monkeypatch.setattr("stream_app.kafka_admin.require_broker", lambda settings, timeout=5.0: 1)
    path = tmp_path / "log.csv"
    path.write_text("visitor,sku,event,time\nv1,i1,view,1700000000\nv1,i2,addtocart,1700000060\n")
    res = cli("replay", "csv", str(path), "--map", "user_id=visitor,item_id=sku,action=event,ts=time",
              "--ts-unit", "s", "--no-progress")
    assert res.exit_code == 0, res.output
    assert [(e["user_id"], e["item_id"], e["action"], e["ts"]) for e in sent["events"]] == [
        ("v1", "i1", "view", 1_700_000_000_000), ("v1", "i2", "cart", 1_700_000_060_000)]


# --- tail, worker ----------------------------------------------------------------------------- #

def test_tail_names_an_unreachable_broker(cli):
    port = free_port()  # bound here and closed again: nothing listens on it
    res = cli("tail", "predictions", env={"NEXTACTION_BROKER_URL": f"kafka://127.0.0.1:{port}"})
    assert res.exit_code == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in cli.flat(res.output)
    assert "nextaction kafka start" in cli.flat(res.output)


def test_worker_execs_faust_with_web_settings(cli, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_stream.os, "execv", lambda path, argv: seen.update(path=path, argv=argv))
    res = cli("worker", "--without-web", env={"NEXTACTION_WEB_PORT": "7000"})
    assert res.exit_code == 0, res.output
    assert seen["argv"][1:] == ["-m", "faust", "-A", "stream_app.app:app", "worker", "-l", "info", "--web-bind", "127.0.0.1",
                                "--web-port", "7000", "--without-web"]
    assert seen["path"] == sys.executable
