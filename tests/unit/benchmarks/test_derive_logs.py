"""benchmarks/derive_logs.py: a day-resolution export keeps every event and each day's events, loses
the time of day and the order within a day, and reads back through ``csv:PATH`` unchanged."""

from __future__ import annotations

import doctest

import benchmarks.derive_logs as derive
from models.datasets import dataset_from_columns, load

DAY_MS = 86_400_000


def _log():
    users, items, ts, acts, cats = [], [], [], [], []
    for u in range(3):
        for k in range(12):  # 12 events 2 hours apart: one or two days each
            users.append(f"u{u}")
            items.append(f"i{(u * 5 + k) % 9}")
            ts.append(1_700_000_000_000 + u * DAY_MS + k * 7_200_000)
            acts.append(k % 3 == 2)
            cats.append(f"c{(u + k) % 4}")
    return dataset_from_columns("t", users, items, ts, [2 if a else 0 for a in acts], categories=cats)


def test_a_day_export_keeps_each_days_events_and_drops_the_time_of_day(tmp_path):
    ds = _log()
    out = tmp_path / "day.csv"
    assert derive.write_day(ds, out) == 36
    assert out.read_text().splitlines()[0] == "user_id,item_id,category_id,behavior_type,date"
    back = load(f"csv:{out}")
    assert list(back.sequences) == list(ds.sequences) and back.has_actions
    moved = 0
    for user, s in ds.sequences.items():
        b = back.sequences[user]
        assert all(t % DAY_MS == 0 for t in b.ts)  # midnight UTC: the time of day is gone
        for day in set(t - t % DAY_MS for t in s.ts):  # every day holds the same events, in another order
            orig = [(i, a, c) for i, a, c, t in zip(s.items, s.actions, s.categories, s.ts) if t - t % DAY_MS == day]
            got = [(i, a, c) for i, a, c, t in zip(b.items, b.actions, b.categories, b.ts) if t == day]
            assert sorted(orig) == sorted(got)
            moved += orig != got
    assert moved > 0  # the within-day order is not the original one


def test_a_log_without_categories_gets_no_category_column(tmp_path):
    ds = dataset_from_columns("t", ["a", "a", "b"], ["x", "y", "x"], [0, 1000, 2000])
    derive.write_day(ds, tmp_path / "d.csv")
    assert (tmp_path / "d.csv").read_text().splitlines()[0] == "user_id,item_id,behavior_type,date"


def test_doctests():
    assert doctest.testmod(derive).failed == 0
