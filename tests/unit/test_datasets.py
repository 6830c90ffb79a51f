"""Loaders and splits on small generated files (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.datasets import (Dataset, datasets_root, fit_sequences, leave_one_out, load, load_csv,
                             prefix_cases, session_split, synthetic, yoochoose_split)
from models.datasets.core import SYNTHETIC_STEP_MS, dataset_from_columns
from models.schema import ACTION_INDEX
from models.errors import DatasetError


@pytest.fixture()
def fake_root(tmp_path: Path) -> Path:
    """Tiny files in the layout and formats of ../shared/datasets."""
    r = tmp_path / "datasets"
    (r / "movielens-100k").mkdir(parents=True)
    # random row order; user 1 has three events at ts 100 in file order 30, 10, 20
    (r / "movielens-100k" / "u.data").write_text(
        "1\t30\t4\t100\n2\t5\t3\t50\n1\t10\t5\t100\n1\t99\t2\t90\n1\t20\t1\t100\n2\t6\t3\t40\n2\t7\t1\t60\n")
    (r / "taobao-userbehavior-head").mkdir()
    (r / "taobao-userbehavior-head" / "UserBehavior.csv").write_text(
        "1,11,100,pv,1511544070\n1,12,100,cart,1511544080\n1,12,100,buy,1511544090\n"
        "2,11,100,pv,1511544000\n2,13,101,fav,1511544005\n2,11,100,pv,1511544010\n3,11,100,pv")  # truncated
    (r / "amazon-beauty-s3rec").mkdir()
    (r / "amazon-beauty-s3rec" / "Beauty.txt").write_text("1 1 2 3 4\n2 2 3 5\n3 1 5 6 2 3\n")
    (r / "amazon-games-sasrec").mkdir()
    (r / "amazon-games-sasrec" / "Video.txt").write_text("1 7\n1 8\n1 9\n2 8\n2 9\n2 7\n3 1\n")
    yc = r / "yoochoose-clicks-100k"
    yc.mkdir()
    hdr = "SessionId\tItemId\tTime\n"
    (yc / "yoochoose-clicks-100k_train_full.txt").write_text(
        hdr + "1\t100\t1396437466.94\n1\t101\t1396437500.5\n2\t101\t1396438000.0\n2\t102\t1396438100.1\n")
    (yc / "yoochoose-clicks-100k_test.txt").write_text(
        hdr + "9\t100\t1396860669.277\n9\t101\t1396860700.0\n9\t102\t1396860800.0\n8\t999\t1396860900.0\n"
        "8\t100\t1396860950.0\n")
    (yc / "yoochoose-clicks-100k_train_tr.txt").write_text(hdr + "1\t100\t1396437466.94\n1\t101\t1396437500.5\n")
    (yc / "yoochoose-clicks-100k_train_valid.txt").write_text(hdr + "2\t101\t1396438000.0\n2\t100\t1396438100.1\n")
    return r


def test_datasets_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXTACTION_DATASETS", str(tmp_path))
    assert datasets_root() == tmp_path
    monkeypatch.delenv("NEXTACTION_DATASETS")
    assert datasets_root().parts[-2:] == ("shared", "datasets")
    assert datasets_root(tmp_path / "x") == tmp_path / "x"


def test_movielens_ties_keep_file_order(fake_root):
    ds = load("ml-100k", fake_root)
    assert ds.has_time and not ds.has_actions
    assert ds.sequences["1"].items == ["99", "30", "10", "20"]  # ts 90, then the ts-100 ties in file order
    assert ds.sequences["1"].ts.tolist() == [90_000, 100_000, 100_000, 100_000]
    assert ds.sequences["2"].items == ["6", "5", "7"]
    assert list(ds.sequences) == ["1", "2"]
    assert ds.items == ["30", "5", "10", "99", "20", "6", "7"]  # first appearance


def test_taobao_truncated_last_line_and_actions(fake_root):
    ds = load("taobao", fake_root)
    assert ds.meta["dropped_truncated_last_line"] == 1
    assert set(ds.sequences) == {"1", "2"}
    s = ds.sequences["1"]
    assert s.actions.tolist() == [ACTION_INDEX["view"], ACTION_INDEX["cart"], ACTION_INDEX["purchase"]]
    assert s.categories == ["100", "100", "100"]
    assert s.ts[0] == 1511544070_000
    assert ds.has_actions and ds.has_time


def test_beauty_and_games_without_time(fake_root):
    b = load("beauty", fake_root)
    assert not b.has_time
    assert b.sequences["3"].items == ["1", "5", "6", "2", "3"]
    assert b.sequences["3"].ts.tolist() == [i * SYNTHETIC_STEP_MS for i in range(5)]
    g = load("games", fake_root)
    assert g.sequences["2"].items == ["8", "9", "7"] and not g.has_time
    assert len(g.sequences["3"]) == 1


def test_yoochoose_sessions_and_split(fake_root):
    ds = load("yoochoose", fake_root)
    assert set(ds.sequences) == {"1", "2", "9", "8"}
    assert ds.sequences["1"].ts.tolist() == [1396437466940, 1396437500500]
    tr = load("yoochoose", fake_root, split="train_full")
    assert set(tr.sequences) == {"1", "2"}
    cat, sp = yoochoose_split(fake_root)
    assert cat.items == ["100", "101", "102"]
    # session 9: two next-click cases; session 8: unknown item 999 dropped -> 1 event -> no case
    assert [(c.user, c.history.items, c.target_item) for c in sp.test] == [
        ("9", ["100"], "101"), ("9", ["100", "101"], "102")]
    _, sp_tune = yoochoose_split(fake_root, tune=True)
    assert [(c.history.items, c.target_item) for c in sp_tune.test] == [(["101"], "100")]
    with pytest.raises(DatasetError, match="split"):
        load("yoochoose", fake_root, split="nope")


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load("beauty", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load("nope", tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load(f"csv:{tmp_path / 'x.csv'}")


def test_parquet_needs_pyarrow(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow installed")
    except ImportError:
        pass
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="pyarrow"):
        load(f"parquet:{p}")


# ----------------------------------------------------------------------------- generic CSV

@pytest.mark.parametrize("delim", [",", "\t", ";", "|"])
def test_generic_header_and_delimiter_detection(tmp_path, delim):
    p = tmp_path / "ev.txt"
    rows = [["visitor_id", "product_id", "event_type", "timestamp"],
            ["a", "p1", "view", "1700000000000"], ["a", "p2", "addtocart", "1700000001000"],
            ["b", "p1", "transaction", "1700000002000"], ["a", "p3", "view", "1700000000500"]]
    p.write_text("\n".join(delim.join(r) for r in rows) + "\n")
    ds = load(f"csv:{p}")
    assert ds.meta["header"] and ds.meta["time_unit"] == "ms"
    assert ds.sequences["a"].items == ["p1", "p3", "p2"]  # sorted by time
    assert ds.sequences["a"].actions.tolist() == [0, 0, ACTION_INDEX["cart"]]
    assert ds.sequences["b"].actions.tolist() == [ACTION_INDEX["purchase"]]
    assert ds.sequences["a"].ts[0] == 1_700_000_000_000


def test_generic_headerless_guess_whitespace_seconds(tmp_path):
    p = tmp_path / "x.dat"
    p.write_text("u1 i1 5 1500000000\nu1 i2 3 1500000060\nu2 i1 4 1499999999.5\n")
    ds = load_csv(p)
    assert ds.meta["delimiter"] == "whitespace" and not ds.meta["header"]
    assert ds.meta["columns"] == {"user": 0, "item": 1, "time": 3} and ds.meta["time_unit"] == "s"
    assert ds.sequences["u2"].ts.tolist() == [1_499_999_999_500]


def test_generic_explicit_mapping_iso_time_and_extra_columns(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("when,who,what,did,dev,geo\n2024-01-01T00:00:10Z,u,i2,Buy,ios,de\n"
                 "2024-01-01 00:00:00,u,i1,click,ios,de\n")
    ds = load_csv(p, columns={"user": "who", "item": "what", "time": "when", "action": "did",
                              "device": "dev", "location": "geo"})
    s = ds.sequences["u"]
    assert ds.meta["time_unit"] == "iso"
    assert s.items == ["i1", "i2"] and s.ts.tolist() == [1704067200000, 1704067210000]
    assert s.devices == ["ios", "ios"] and s.locations == ["de", "de"]
    assert s.actions.tolist() == [ACTION_INDEX["click"], ACTION_INDEX["purchase"]]


def test_generic_action_map_and_explicit_unit(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("1,10,seen,5\n1,11,bought,7\n")
    ds = load_csv(p, columns={"user": 0, "item": 1, "action": 2, "time": 3}, time_unit="s",
                  action_map={"seen": "view", "bought": "purchase"})
    assert ds.sequences["1"].ts.tolist() == [5000, 7000]
    assert ds.sequences["1"].actions.tolist() == [0, ACTION_INDEX["purchase"]]


def test_generic_malformed_rows_strict_and_lenient(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("user,item,ts\nu,i1,100\nu,i2,notatime\nu,i3\nu,i4,400\nu,,500\n")
    with pytest.raises(DatasetError) as e:
        load_csv(p)
    msg = str(e.value)
    assert "bad.csv:4" in msg and "expected at least 3 fields" in msg  # row shape checked first
    ds = load_csv(p, lenient=True)
    assert ds.meta["skipped_rows"] == 3
    assert ds.sequences["u"].items == ["i1", "i4"]
    p2 = tmp_path / "bad2.csv"
    p2.write_text("user,item,ts\nu,i1,100\nu,i2,notatime\n")
    with pytest.raises(DatasetError, match=r"bad2.csv:3: bad time value 'notatime'"):
        load_csv(p2)
    p3 = tmp_path / "bad3.csv"
    p3.write_text("user,item,action,ts\nu,i1,view,100\nu,i2,teleport,200\n")
    with pytest.raises(DatasetError, match=r"bad3.csv:3: bad action value 'teleport'"):
        load_csv(p3)


def test_generic_errors_on_unknown_columns(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DatasetError, match="cannot tell the user/item"):
        load_csv(p, header=True)
    with pytest.raises(DatasetError, match="not in header"):
        load_csv(p, header=True, columns={"user": "a", "item": "zzz"})
    with pytest.raises(DatasetError, match="role"):
        load_csv(p, header=True, columns={"user": "a", "item": "b", "price": "c"})


def test_generic_min_events(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("user,item,ts\na,1,1\na,2,2\nb,1,3\n")
    ds = load_csv(p, min_events=2)
    assert list(ds.sequences) == ["a"]


# ----------------------------------------------------------------------------- splits

def _toy() -> Dataset:
    return dataset_from_columns("toy", users=list("uuuuvvwwww"), items=list("abcdabxyzx"),
                                ts=[1, 2, 3, 4, 1, 2, 5, 6, 7, 8])


def test_leave_one_out():
    ds = _toy()
    sp = leave_one_out(ds, min_len=3)
    assert sp.train["u"].items == ["a", "b"] and sp.train["v"].items == ["a", "b"]  # short user kept
    assert [(c.user, c.target_item) for c in sp.valid] == [("u", "c"), ("w", "z")]
    assert [(c.user, c.history.items, c.target_item, c.target_ts) for c in sp.test] == [
        ("u", ["a", "b", "c"], "d", 4), ("w", ["x", "y", "z"], "x", 8)]
    assert sp.valid[0].history.items == ["a", "b"]
    dropped = leave_one_out(ds, short_users="drop")
    assert "v" not in dropped.train
    fit = fit_sequences(sp, "test")
    assert fit["u"].items == ["a", "b", "c"] and fit["v"].items == ["a", "b"]
    assert fit_sequences(sp, "valid") is sp.train
    with pytest.raises(DatasetError):
        leave_one_out(ds, min_len=2)


def test_prefix_and_session_split():
    tr = dataset_from_columns("tr", ["s1"] * 3, ["a", "b", "c"], [1, 2, 3])
    te = dataset_from_columns("te", ["s2"] * 3, ["a", "q", "c"], [4, 5, 6])
    sp = session_split(tr, te)
    assert [(c.history.items, c.target_item) for c in sp.test] == [(["a"], "c")]  # unknown 'q' dropped
    assert len(prefix_cases(tr.sequences)) == 2


def test_synthetic_is_seeded_and_structured():
    a, b, c = synthetic(n_users=20, seed=3), synthetic(n_users=20, seed=3), synthetic(n_users=20, seed=4)
    assert all(a.sequences[u] == b.sequences[u] for u in a.sequences)
    assert any(a.sequences[u] != c.sequences[u] for u in a.sequences)
    s = a.sequences["u00"]
    assert np.all(np.diff(s.ts) > 0) and a.has_actions
    # the funnel: every purchase comes right after a cart of the same item
    purchases = [(s.actions[i - 1], s.items[i - 1], s.items[i]) for s in a.sequences.values()
                 for i in range(1, len(s)) if s.actions[i] == ACTION_INDEX["purchase"]]
    assert purchases and all(act == ACTION_INDEX["cart"] and prev == item for act, prev, item in purchases)
    assert s.actions[0] == ACTION_INDEX["view"]


def test_synthetic_seeds_share_the_catalogue_of_n_items():
    """Two seeds over the same n_items: the same items, each in the same category (the demo trains
    on one seed and streams another)."""
    a, c = synthetic(n_users=30, n_items=80, seed=1), synthetic(n_users=30, n_items=80, seed=2)
    assert a.items == c.items == [f"i{k}" for k in range(80)]

    def category_of(ds):
        return {i: cat for s in ds.sequences.values() for i, cat in zip(s.items, s.categories)}

    ca, cc = category_of(a), category_of(c)
    shared = set(ca) & set(cc)
    assert len(shared) > 10 and all(ca[i] == cc[i] for i in shared)


def test_synthetic_lengths_and_options_in_the_name():
    ds = load("synthetic", n_users=40, n_items=20, min_len=6, max_len=12)
    lens = [len(s) for s in ds.sequences.values()]
    assert len(lens) == 40 and min(lens) >= 6 and max(lens) <= 12 and len(ds.items) == 20
    named = load("synthetic:n_users=40, n_items=20,seed=5")
    assert named.meta["seed"] == 5 and all(
        named.sequences[u] == s for u, s in synthetic(n_users=40, n_items=20, seed=5).sequences.items())
    with pytest.raises(DatasetError, match="is not KEY=INTEGER"):
        load("synthetic:n_items=many")
    with pytest.raises(DatasetError, match="unknown options"):
        load("synthetic:colour=3")