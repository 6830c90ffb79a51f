"""Replay sources: Taobao CSV, generic CSV, the seeded synthetic generator."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict

import pytest

from models.schema import ACTIONS
from models.errors import DatasetError
from stream_app.errors import EventRejected
from stream_app.events import parse_event
from stream_app.replay import RAW, encode, generic_csv, rebase, synthetic, taobao_csv

NOW = 1_800_000_000_000


def test_taobao_maps_actions_and_seconds_and_counts_bad_rows(tmp_path):
    f = tmp_path / "UserBehavior.csv"
    f.write_text("1,2268318,2520377,pv,1511544070\n"
                 "1,2333346,2520771,buy,1511561733\n"
                 "1,2576651,149192,cart,1511572885\n"
                 "2,3830808,4181361,fav,1511593493\n"
                 "2,1,2,jump,1511593493\n"        # unknown behaviour
                 "2,1,2,pv,-5\n"                  # bad timestamp
                 "2,1,2,pv\n"                     # missing column
                 "3,46259,1029459,pv,15116")      # truncated last line (no newline): ts too small? kept as number
    src = taobao_csv(f)
    evs = list(src)
    assert [e["action"] for e in evs][:4] == ["view", "purchase", "cart", "fav"]
    assert evs[0] == {"user_id": "1", "item_id": "2268318", "action": "view", "ts": 1511544070000,
                      "category": "2520377"}
    assert src.dropped == Counter({"action": 1, "ts": 1, "columns": 1}) and src.rows == 8 and src.emitted == 5


def test_taobao_truncated_mid_field(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("1,2,3,pv,1511544070\n1,2,3,p")
    src = taobao_csv(f)
    assert len(list(src)) == 1 and sum(src.dropped.values()) == 1


def test_taobao_rebase_preserves_gaps(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("1,2,3,pv,1511544070\n1,3,3,pv,1511544100\n")
    before = time.time() * 1000
    a, b = list(taobao_csv(f, rebase_time=True))
    assert b["ts"] - a["ts"] == 30_000 and before - 1000 <= b["ts"] <= time.time() * 1000 + 1000


def test_taobao_missing_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv"):
        taobao_csv(tmp_path / "nope.csv")


def test_generic_csv_mapping_units_and_aliases(tmp_path):
    f = tmp_path / "events.csv"
    f.write_text("timestamp,visitorid,event,itemid,transactionid,price\n"
                 "1433221332117,257597,view,355908,,\n"
                 "1433224214164,992329,addtocart,248676,,12.5\n"
                 "1433221955914,121688,transaction,15335,11117,\n"
                 "1433221955999,121688,teleport,15335,,\n"
                 "1433221955999,,view,15335,,\n"
                 "notatime,1,view,2,,\n")
    m = {"user_id": "visitorid", "item_id": "itemid", "action": "event", "ts": "timestamp", "price": "price"}
    src = generic_csv(f, m)
    evs = list(src)
    assert [e["action"] for e in evs] == ["view", "cart", "purchase"]
    assert evs[1] == {"ts": 1433224214164, "user_id": "992329", "action": "cart", "item_id": "248676", "price": 12.5}
    assert src.dropped == Counter({"action": 1, "empty_user_id": 1, "ts": 1})
    g = tmp_path / "s.csv"
    g.write_text("u,i,a,t\nx,y,pv,1511544070.5\n")
    (e,) = generic_csv(g, {"user_id": "u", "item_id": "i", "action": "a", "ts": "t"}, ts_unit="s")
    assert e["ts"] == 1511544070500 and e["action"] == "view"


def test_generic_csv_errors_name_the_value(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text("a,b,c,d\n")
    good = {"user_id": "a", "item_id": "b", "action": "c", "ts": "d"}
    with pytest.raises(DatasetError, match="colour"):
        generic_csv(f, {**good, "colour": "x"})
    with pytest.raises(DatasetError, match="ts"):
        generic_csv(f, {k: v for k, v in good.items() if k != "ts"})
    with pytest.raises(DatasetError, match="fortnights"):
        generic_csv(f, good, ts_unit="fortnights")
    with pytest.raises(DatasetError, match="zzz"):
        list(generic_csv(f, {**good, "ts": "zzz"}))


def test_synthetic_is_seeded_and_deterministic():
    a = list(synthetic(3000, 100, seed=1))
    assert a == list(synthetic(3000, 100, seed=1))
    assert a != list(synthetic(3000, 100, seed=2))
    assert len(a) == 3000 and list(synthetic(0, 10, seed=1)) == []


def test_synthetic_is_realistic():
    evs = list(synthetic(20_000, 300, seed=3))
    for e in evs[:2000]:
        parse_event(encode(e)[1], now_ms=NOW, key=e["user_id"].encode())  # all valid
    assert all(a["ts"] <= b["ts"] for a, b in zip(evs, evs[1:]))
    by_user = defaultdict(list)
    for e in evs:
        by_user[e["user_id"]].append(e)
    assert len(by_user) == 300
    sizes = sorted(len(v) for v in by_user.values())
    assert sizes[-1] > 4 * statistics.median(sizes)  # heavy-tailed activity
    gaps_in, gaps_between, funnel_ok, devices = [], [], 0, set()
    for user_events in by_user.values():
        assert len({e["location"] for e in user_events}) == 1  # a user stays in one region
        devices.add(user_events[0]["device"])
        for p, n in zip(user_events, user_events[1:]):
            assert n["ts"] > p["ts"]  # strictly increasing per user: (user, ts) identifies an event
            (gaps_in if n["session_id"] == p["session_id"] else gaps_between).append(n["ts"] - p["ts"])
            if n["action"] == "purchase":
                funnel_ok += p["action"] == "cart" and p["item_id"] == n["item_id"]
    assert statistics.median(gaps_in) < 60_000 < 3_600_000 < statistics.median(gaps_between)
    actions = Counter(e["action"] for e in evs)
    assert set(actions) == set(ACTIONS) and actions["view"] > actions["cart"] > actions["purchase"]
    assert funnel_ok == actions["purchase"]  # every purchase follows a cart of the same item
    assert devices == {"ios", "android", "web"}
    items = Counter(e["item_id"] for e in evs)
    top = items.most_common()
    assert top[0][1] > 10 * statistics.median(c for _, c in top)  # Zipf-like popularity


def test_synthetic_streams_the_dataset_generator_over_n_items():
    """The replay is models.datasets.synthetic's events (what `nextaction train --dataset synthetic`
    learns from), over an explicit catalogue shared by every seed."""
    from models.datasets.synthetic import events

    assert list(synthetic(500, 20, seed=4, n_items=60)) == list(events(500, 20, seed=4, n_items=60))
    for seed in (1, 2):
        assert {e["item_id"] for e in synthetic(3000, 50, seed=seed, n_items=60)} <= {f"i{k}" for k in range(60)}


def test_synthetic_bad_fraction_produces_each_rejection_kind():
    evs = list(synthetic(4000, 50, seed=5, bad_fraction=0.05))
    reasons = Counter()
    for e in evs:
        key, value = encode(e)
        try:
            parse_event(value, now_ms=NOW, key=key)
        except EventRejected as exc:
            reasons[exc.reason] += 1
    assert 100 < sum(reasons.values()) < 320
    assert set(reasons) == {"not_json", "missing_field", "bad_action", "bad_ts", "bad_type", "bad_value",
                            "not_object", "key_mismatch"}
    assert sum(RAW in e for e in evs) > 0
    with pytest.raises(DatasetError, match="bad_fraction"):
        list(synthetic(10, 1, seed=1, bad_fraction=1.5))


def test_rebase_shifts_to_now_keeping_gaps():
    evs = rebase([{"ts": 1000}, {"ts": 4000}, {RAW: b"x"}], now_ms=10_000)
    assert [e.get("ts") for e in evs] == [7000, 10_000, None]
