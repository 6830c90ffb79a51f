"""stream_app.cli.demo: the model the demo trains (the broker, worker and replay are the integration tests')."""

from __future__ import annotations

import pytest
import typer

from stream_app.cli import demo as cli_demo
from stream_app.settings import Settings


@pytest.mark.slow  # trains a model (several seconds)
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


# --- the final view: pure functions of the events sent and the predictions read back ------------------------

def _run(n_events=400, n_users=25, answered=None):
    """Real synthetic events (the demo's generator) and prediction records as the worker writes them:
    each event's prediction names the user's next item first, except every third one."""
    from stream_app.replay import synthetic

    events = list(synthetic(n_events, n_users, seed=7, n_items=60))
    by_user: dict[str, list[dict]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e)
    preds = []
    for seq in by_user.values():
        for k, e in enumerate(seq):
            nxt = seq[k + 1]["item_id"] if k + 1 < len(seq) and k % 3 else "i999"
            preds.append({"user_id": e["user_id"], "event_ts": e["ts"], "model_version": "abc123",
                          "action_probs": {"view": 0.55, "click": 0.2, "cart": 0.1, "fav": 0.05, "purchase": 0.1},
                          "top_items": [[nxt, 0.3], ["i1", 0.1]], "latency_ms": 1.0 + len(preds) % 10})
    return cli_demo.DemoRun(events, preds if answered is None else preds[:answered], 3.5)


def test_the_final_view_shows_the_busiest_users_side_by_side_with_hits_marked():
    from collections import Counter

    from rich.console import Console

    run = _run()
    counts = Counter(e["user_id"] for e in run.events)
    users = cli_demo.busiest_users(run.events, 3)
    assert [counts[u] for u in users] == sorted(counts.values(), reverse=True)[:3]
    lines = cli_demo.timelines(run.events, run.predictions, users, last=4)
    for user, steps in lines.items():
        mine = sorted((e for e in run.events if e["user_id"] == user), key=lambda e: e["ts"])
        assert [s.event for s in steps] == mine[-4:]  # the last four, oldest first
        assert all(s.prediction["event_ts"] == s.event["ts"] for s in steps)
        # a step is a hit when the previous prediction named its item: here every one but those after k % 3 == 0
        for k, s in zip(range(len(mine) - 4, len(mine)), steps):
            assert s.hit == (k > 0 and (k - 1) % 3 != 0), (user, k)
    console = Console(record=True, width=100)
    console.print(cli_demo.users_table(lines, counts))
    text = console.export_text()
    header = next(line for line in text.splitlines() if users[0] in line)
    assert all(f"{u} ({counts[u]} events)" in header for u in users)  # one row: side by side
    body = "\n".join(line for line in text.splitlines() if line.startswith("│"))
    assert body.count("✓") == sum(s.hit is True for steps in lines.values() for s in steps) > 0
    assert body.count("→ view 0.55") == 12 and "i1 0.10" in body


def test_the_summary_line_counts_events_predictions_dead_letters_and_latency():
    run = _run(answered=390)
    line = cli_demo.summary_line(run.sent, run.predictions, 7, run.elapsed)
    lats = sorted(p["latency_ms"] for p in run.predictions)
    assert line == f"400 events → 390 predictions, 7 dead-lettered, p50 {lats[195]:.1f} ms, p99 {lats[386]:.1f} ms (3.5 s)"
    assert cli_demo.summary_line(3, [], None, 1.0) == "3 events → 0 predictions, ? dead-lettered (1.0 s)"


def test_a_user_whose_last_events_got_no_prediction_says_so():
    from rich.console import Console

    run = _run(n_events=60, n_users=3)
    users = cli_demo.busiest_users(run.events, 1)
    last = max((e for e in run.events if e["user_id"] == users[0]), key=lambda e: e["ts"])
    preds = [p for p in run.predictions if (p["user_id"], p["event_ts"]) != (users[0], last["ts"])]
    steps = cli_demo.timelines(run.events, preds, users, last=2)[users[0]]
    assert steps[-1].prediction is None and steps[0].prediction is not None
    console = Console(record=True, width=60)
    console.print(cli_demo.step_text(steps[-1]))
    assert "→ no prediction" in console.export_text()


def test_dead_letters_come_from_the_worker_s_metrics():
    """Read from a real HTTP /metrics (the registry's exposition served by a local server); None when
    nothing answers."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from stream_app import monitoring
    from stream_app.ports import free_port
    from stream_app.status import parse_metrics

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = monitoring.render()[0]
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monitoring.EVENTS_REJECTED.labels("not_json").inc(0)  # make sure the family has a sample to read
    before = sum(v for _, v in parse_metrics(monitoring.render()[0].decode())
                 .get("nextaction_events_rejected_total", []))
    server = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monitoring.EVENTS_REJECTED.labels("bad_ts").inc(2)
        assert cli_demo.worker_dead_letters(f"http://127.0.0.1:{server.server_port}/metrics") == before + 2
    finally:
        server.shutdown()
    assert cli_demo.worker_dead_letters(f"http://127.0.0.1:{free_port()}/metrics") is None
