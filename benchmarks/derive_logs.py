"""Derived logs for generalisation checks: a shipped log exported the way other systems export theirs.

Question: do the defaults (``models.auto`` and the fits after training) still win when a log's
shape changes in ways a user's export commonly has, without any setting changed for it?

    .venv/bin/python -m benchmarks.derive_logs day taobao var/derived/taobao-day.csv
    .venv/bin/python -m benchmarks.quality --datasets taobao-day=csv:var/derived/taobao-day.csv \\
        --checkpoints runs/q9 --train --gru --dry-run

Derivations:

* ``day`` -- **day-resolution times**: each timestamp cut to its UTC date (``YYYY-MM-DD``), and each
  user's events of one day in an arbitrary but fixed order (a hash of user, item and the original
  second), as a daily export without time of day holds them. The gap and hour features carry no
  signal any more, and "the last event" of a day is a guess.

The output is a CSV that ``csv:PATH`` (:mod:`models.datasets.generic`) reads with no options:
``user_id,item_id[,category_id],behavior_type,date``. Written under ``var/`` (git-ignored): derived
data never goes into the repository.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.datasets import load  # noqa: E402
from models.schema import ACTIONS  # noqa: E402

DAY_S = 86_400


def day_order_key(user: str, item: str, ts_s: int) -> str:
    """The within-day order of an event in a ``day`` export: a hash, so neither time nor file order.

    >>> day_order_key("1", "2268318", 1511544070)[:12]
    '249fc1d3b68b'
    """
    return hashlib.sha1(f"{user},{item},{ts_s}".encode()).hexdigest()


def day_rows(ds):
    """The ``day`` derivation of dataset ``ds``: rows ``(user, item, category, action, date)``, users
    in the dataset's order, each user's days in time order, a day's events in :func:`day_order_key`
    order. ``category`` is ``""`` where the log names none."""
    for user, s in ds.sequences.items():
        ts_s = [int(t) // 1000 for t in s.ts]
        rows = [(t - t % DAY_S, day_order_key(user, item, t), item, cat, ACTIONS[int(a)])
                for item, a, t, cat in zip(s.items, s.actions, ts_s, s.categories)]
        rows.sort(key=lambda r: (r[0], r[1]))
        for day, _, item, cat, action in rows:
            yield user, item, cat, action, datetime.fromtimestamp(day, timezone.utc).strftime("%Y-%m-%d")


def write_day(ds, out: Path) -> int:
    """Write :func:`day_rows` of ``ds`` as CSV to ``out``; returns the number of events written."""
    rows = list(day_rows(ds))
    has_cat = any(r[2] for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id"] + (["category_id"] if has_cat else []) + ["behavior_type", "date"])
        for user, item, cat, action, date in rows:
            w.writerow([user, item] + ([cat] if has_cat else []) + [action, date])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("derivation", choices=["day"])
    ap.add_argument("dataset", help="a name models.datasets.load knows (taobao, ...) or csv:PATH")
    ap.add_argument("out", type=Path)
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args(argv)
    ds = load(args.dataset, args.root)
    if not ds.has_time:
        print(f"{args.dataset}: the log has no timestamps to cut to days", file=sys.stderr)
        return 2
    n = write_day(ds, args.out)
    print(f"{args.out}: {n:,} events of {len(ds.sequences):,} users, day resolution")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
