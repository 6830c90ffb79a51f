"""The CLI's argument parsing and its errors (no broker: replay/produce and exec are faked)."""

from __future__ import annotations

import sys
import types

import pytest
import typer
from typer.testing import CliRunner

from stream_app import cli
from stream_app.cli import demo as cli_demo
from stream_app.cli import stream as cli_stream
from stream_app.ports import free_port
from stream_app.settings import Settings, get_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch, tmp_path):
    """Each test reads settings afresh from its own environment."""
    for name in [k for k in list(__import__("os").environ) if k.startswith("NEXTACTION_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NEXTACTION_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _dead_port() -> int:
    """A port nothing listens on (bound here and closed again)."""
    return free_port()


def _invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(cli.app, list(args), env=env)


@pytest.fixture
def fake_replay(monkeypatch):
    """A stand-in ``stream_app.replay`` recording what the CLI asked for; the broker check is skipped."""
    calls: dict = {}
    mod = types.ModuleType("stream_app.replay")

    def synthetic(n_events, n_users, seed, n_items=None):
        calls["synthetic"] = (n_events, n_users, seed)
        calls["n_items"] = n_items
        return iter([{"user_id": f"u{i}", "item_id": "i", "action": "view", "ts": 1_700_000_000_000 + i}
                     for i in range(n_events)])

    def taobao_csv(path, rebase_time):
        calls["taobao"] = (str(path), rebase_time)
        return iter([{"user_id": "u", "item_id": "i", "action": "view", "ts": 1_700_000_000_000}] * 5)

    def generic_csv(path, mapping, rebase_time, ts_unit):
        calls["csv"] = (str(path), mapping, rebase_time, ts_unit)
        return iter([{"user_id": "u", "item_id": "i", "action": "view", "ts": 1_700_000_000_000}])

    async def produce(settings, events, rate, progress):
        events = list(events)
        calls["produce"] = (settings.topic_events, rate, progress, events)
        return len(events)

    mod.synthetic, mod.taobao_csv, mod.generic_csv, mod.produce = synthetic, taobao_csv, generic_csv, produce
    monkeypatch.setitem(sys.modules, "stream_app.replay", mod)
    import stream_app

    monkeypatch.setattr(stream_app, "replay", mod, raising=False)
    monkeypatch.setattr("stream_app.kafka_admin.require_broker", lambda settings, timeout=5.0: 1)
    return calls


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

def test_replay_synthetic_passes_options(fake_replay):
    res = _invoke("replay", "synthetic", "--events", "7", "--users", "3", "--seed", "5", "--rate", "250",
                  "--no-progress")
    assert res.exit_code == 0, res.output
    assert fake_replay["synthetic"] == (7, 3, 5) and fake_replay["n_items"] is None  # the generator's default
    topic, rate, progress, events = fake_replay["produce"]
    assert (topic, rate, progress, len(events)) == ("events", 250.0, False, 7)
    assert "sent 7 events to events" in res.output


def test_replay_synthetic_items_sets_the_catalogue(fake_replay):
    assert _invoke("replay", "synthetic", "-n", "2", "--items", "60").exit_code == 0
    assert fake_replay["n_items"] == 60


def test_replay_default_rate_is_as_fast_as_possible(fake_replay):
    assert _invoke("replay", "synthetic", "-n", "2").exit_code == 0
    assert fake_replay["produce"][1] is None


def test_replay_taobao_limit_and_rebase(fake_replay, tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,2,3,pv,1511544070\n")
    res = _invoke("replay", "taobao", str(path), "--limit", "3", "--rebase-time")
    assert res.exit_code == 0, res.output
    assert fake_replay["taobao"] == (str(path), True)
    assert len(fake_replay["produce"][3]) == 3


def test_replay_csv_mapping_and_seconds(fake_replay, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,sku,type,time\n")
    res = _invoke("replay", "csv", str(path), "--map", "user_id=uid,item_id=sku", "--map", "action=type,ts=time",
                  "--ts-unit", "s")
    assert res.exit_code == 0, res.output
    assert fake_replay["csv"] == (str(path), {"user_id": "uid", "item_id": "sku", "action": "type", "ts": "time"},
                                  False, "s")
    assert len(fake_replay["produce"][3]) == 1


def test_replay_csv_default_ts_unit_is_ms(fake_replay, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,sku,type,time\n")
    assert _invoke("replay", "csv", str(path), "-m", "user_id=uid,item_id=sku,action=type,ts=time").exit_code == 0
    assert fake_replay["csv"][3] == "ms"


@pytest.mark.parametrize("args, message", [
    (["replay", "synthetic", "--rate", "0"], "--rate must be > 0, got 0.0"),
    (["replay", "synthetic", "--events", "-5"], "--events must be > 0, got -5"),
    (["replay", "synthetic", "--events", "many"], "Invalid value for '--events' / '-n': Input should be a valid integer"),
    (["replay", "taobao", "/nonexistent/UserBehavior.csv"], "no such file: /nonexistent/UserBehavior.csv"),
    (["tail", "predictions", "--max", "0"], "--max must be > 0, got 0"),
    (["tail", "predictions", "--timeout", "-1"], "--timeout must be > 0, got -1.0"),
    (["kafka", "start", "--timeout", "0"], "--timeout must be > 0, got 0.0"),
    (["demo", "--rate", "-3"], "--rate must be > 0, got -3.0"),
    (["demo", "--items", "0"], "--items must be > 0, got 0"),
])
def test_bad_option_values_are_named(args, message):
    res = _invoke(*args)
    assert res.exit_code == 2
    assert message in _flat(res.output)


def test_csv_bad_mapping_and_ts_unit(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("a,b\n")
    res = _invoke("replay", "csv", str(path), "--map", "user_id=a,wat=b")
    assert res.exit_code == 2 and "unknown event field 'wat'" in _flat(res.output)
    res = _invoke("replay", "csv", str(path), "--map", "user_id=a,item_id=b,action=c,ts=d", "--ts-unit", "h")
    assert res.exit_code == 2 and "'h' is not one of" in _flat(res.output)


def _flat(text: str) -> str:
    """CLI output with rich's box drawing and line wrapping removed."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


# --- broker-facing commands without a broker ---------------------------------------------------- #

def test_tail_names_an_unreachable_broker():
    port = _dead_port()
    res = _invoke("tail", "predictions", env={"NEXTACTION_BROKER_URL": f"kafka://127.0.0.1:{port}"})
    assert res.exit_code == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in _flat(res.output)
    assert "nextaction kafka start" in _flat(res.output)


def test_kafka_status_when_down_exits_1(tmp_path):
    port = _dead_port()
    res = _invoke("kafka", "status", env={"NEXTACTION_KAFKA_PORT": str(port),
                                          "NEXTACTION_BROKER_URL": f"kafka://127.0.0.1:{port}"})
    assert res.exit_code == 1
    assert "not running" in res.output and f"127.0.0.1:{port}" in res.output


def test_kafka_stop_when_not_running():
    res = _invoke("kafka", "stop")
    assert res.exit_code == 0 and "was not running" in res.output


def test_bad_setting_in_environment_is_named():
    res = _invoke("kafka", "status", env={"NEXTACTION_KAFKA_PORT": "0"})
    assert res.exit_code == 1
    assert "'kafka_port' = '0': must be >= 1" in _flat(res.output)


def test_same_kafka_and_controller_port_is_rejected():
    res = _invoke("kafka", "start", env={"NEXTACTION_KAFKA_PORT": "19555", "NEXTACTION_KAFKA_CONTROLLER_PORT": "19555"})
    assert res.exit_code == 1
    assert "'kafka_controller_port' = 19555: must differ from kafka_port" in _flat(res.output)


# --- worker, train, evaluate ------------------------------------------------------------------ #

def test_worker_execs_faust_with_web_settings(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_stream.os, "execv", lambda path, argv: seen.update(path=path, argv=argv))
    res = _invoke("worker", "--without-web", env={"NEXTACTION_WEB_PORT": "7000"})
    assert res.exit_code == 0, res.output
    assert seen["argv"][1:] == ["-m", "faust", "-A", "stream_app.app:app", "worker", "-l", "info", "--web-bind", "127.0.0.1",
                                "--web-port", "7000", "--without-web"]
    assert seen["path"] == sys.executable


def test_train_and_evaluate_run_the_real_commands(tmp_path):
    out = tmp_path / "ckpt"
    res = _invoke("train", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--budget-min", "0.2",
                  "--threads", "1")
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists() and (out / "model.safetensors").exists()
    res = _invoke("evaluate", "--help")
    assert res.exit_code == 0 and "nextaction evaluate" in res.output


def test_train_help_and_bad_values(tmp_path):
    res = _invoke("train", "--help")
    assert res.exit_code == 0 and "Checkpoint directory" in _flat(res.output) and "nextaction train" in res.output
    res = _invoke("train", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--epochs", "lots")
    assert res.exit_code == 2 and "'--epochs'" in _flat(res.output)
    assert not (tmp_path / "x").exists()


def test_train_errors_are_one_line_and_help_needs_no_torch(tmp_path):
    res = _invoke("train", "--dataset", "synthetic:n_items=many", "--out", str(tmp_path / "x"))
    assert res.exit_code == 1 and "'n_items=many' is not KEY=INTEGER" in _flat(res.output)
    assert "Traceback" not in res.output
    import subprocess

    code = ("import sys; from stream_app.cli import app\n"
            "try: app(['train', '--help'])\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--budget-min" in done.stdout


def test_replay_csv_through_the_real_csv_reader(monkeypatch, tmp_path):
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
    res = _invoke("replay", "csv", str(path), "--map", "user_id=visitor,item_id=sku,action=event,ts=time",
                  "--ts-unit", "s", "--no-progress")
    assert res.exit_code == 0, res.output
    assert [(e["user_id"], e["item_id"], e["action"], e["ts"]) for e in sent["events"]] == [
        ("v1", "i1", "view", 1_700_000_000_000), ("v1", "i2", "cart", 1_700_000_060_000)]


def test_demo_trains_a_real_model_on_synthetic_data(monkeypatch, tmp_path):
    from models.checkpoint import load_checkpoint

    monkeypatch.setenv("NEXTACTION_DATA_DIR", str(tmp_path / "var"))
    out = cli_demo.train_model(Settings(), n_items=60, seed=7, budget_min=0.1)
    assert out == tmp_path / "var" / "demo" / "model"
    ck = load_checkpoint(out)  # a real, hash-verified checkpoint ...
    assert ck.version and ck.metadata["dataset"] == "synthetic"
    assert ck.vocab.items == [f"i{k}" for k in range(60)]  # ... over the streamed catalogue


def test_demo_training_failure_falls_back_to_the_baseline(monkeypatch, tmp_path):
    def fail(**kwargs):
        raise typer.Exit(1)

    monkeypatch.setattr(cli_demo.offline, "train", fail)
    assert cli_demo.train_model(Settings(data_dir=tmp_path), n_items=60, seed=7) is None
