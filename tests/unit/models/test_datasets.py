"""models.datasets: the loaders by name (``load``, ``yoochoose_split``) on small generated files in the
layout and formats of ../shared/datasets (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.datasets import load, yoochoose_split
from models.datasets.core import SYNTHETIC_STEP_MS
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
