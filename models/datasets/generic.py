"""The generic loader: any delimited user/item[/time/action/...] file, without code changes.

What it works out by itself (each can be given explicitly instead):

- **delimiter**: the candidate (``,`` TAB ``;`` ``|`` whitespace) that splits the first lines into
  the same number (> 1) of fields;
- **header**: present when a first-row field is a known column name (``user_id``, ``SessionId``,
  ``timestamp`` ...) or is non-numeric where the rows below are numeric;
- **columns**: from header names (synonyms below); without a header: ``user, item`` then, if
  present, the action column (values that are action names) and the time column (the last
  numeric column whose values look like epoch time);
- **time unit**: numeric values by magnitude (``< 1e11`` seconds, ``< 1e14`` ms, ``< 1e17`` us,
  else ns; fractions allowed); otherwise ISO-8601 text (naive = UTC).

Malformed rows raise :class:`DatasetError` naming the file, the line number and the bad value;
``lenient=True`` skips them instead and reports ``meta["skipped_rows"]`` (plus a few examples).
A last line without a trailing newline that does not parse is treated as a truncated copy and
dropped (``meta["dropped_truncated_last_line"]``) -- the Taobao head file ends that way.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.datasets.core import Dataset, dataset_from_columns
from models.schema import ACTION_INDEX, canonical_action
from models.errors import DatasetError

ROLES = ("user", "item", "time", "action", "device", "location", "category")

#: Header names recognised per role (compared lower-case with ``_``, ``-``, spaces removed).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "user": ("user", "userid", "uid", "sessionid", "session", "visitorid", "customerid", "customer",
             "clientid", "accountid", "reviewerid", "memberid"),
    "item": ("item", "itemid", "iid", "productid", "product", "movieid", "sku", "asin", "articleid",
             "contentid", "objectid"),
    "time": ("time", "ts", "timestamp", "eventtime", "datetime", "date", "unixtime", "created",
             "createdat", "eventts", "time_ms"),
    "action": ("action", "behavior", "behaviortype", "behaviour", "event", "eventtype", "type",
               "actiontype", "interaction"),
    "device": ("device", "devicetype", "platform", "os"),
    "location": ("location", "region", "country", "geohash", "city", "geo"),
    "category": ("category", "categoryid", "cat", "catid", "genre"),
}

_DELIMS = (",", "\t", ";", "|", "ws")


def _norm(name: str) -> str:
    return name.strip().strip('"').lower().replace("_", "").replace("-", "").replace(" ", "")


def _is_num(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def _split_lines(lines: list[str], delim: str) -> list[list[str]]:
    if delim == "ws":
        return [ln.split() for ln in lines]
    return list(csv.reader(lines, delimiter=delim))


def sniff_delimiter(sample_lines: list[str]) -> str:
    """The delimiter that splits every sample line into the same number (> 1) of fields.

    >>> sniff_delimiter(["a\\tb\\tc", "1\\t2\\t3"]), sniff_delimiter(["1 2", "3 4"]), sniff_delimiter(["u,i", "1,2"])
    ('\\t', 'ws', ',')
    """
    lines = [ln for ln in sample_lines if ln.strip()]
    best, best_score = None, 0.0
    for d in _DELIMS:
        counts = [len(r) for r in _split_lines(lines, d)]
        if not counts:
            continue
        mode = max(set(counts), key=counts.count)
        share = counts.count(mode) / len(counts)
        if mode > 1 and share >= 0.6 and share > best_score:
            best, best_score = d, share
    if best is None:
        raise DatasetError("cannot detect the delimiter (tried , TAB ; | whitespace); pass delimiter=")
    return best


def time_unit_of(values: np.ndarray) -> str:
    """``s``/``ms``/``us``/``ns`` from the magnitude of epoch-time values.

    >>> time_unit_of(np.array([1.5e9])), time_unit_of(np.array([1.5e12])), time_unit_of(np.array([0.0, 30.0]))
    ('s', 'ms', 's')
    """
    v = np.abs(values[np.isfinite(values)])
    med = float(np.median(v)) if v.size else 0.0
    if med < 1e11:
        return "s"
    if med < 1e14:
        return "ms"
    if med < 1e17:
        return "us"
    return "ns"


_TO_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


def _parse_iso(x: str) -> float:
    d = datetime.fromisoformat(x.strip().replace("Z", "+00:00"))
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp() * 1e3


def _guess_columns(first: list[str], rows: list[list[str]], has_header: bool) -> dict[str, int]:
    if has_header:
        names = [_norm(h) for h in first]
        out: dict[str, int] = {}
        for role in ROLES:
            for syn in SYNONYMS[role]:
                if syn in names and names.index(syn) not in out.values():
                    out[role] = names.index(syn)
                    break
        if "user" not in out or "item" not in out:
            raise DatasetError(f"cannot tell the user/item columns from header {first}; pass columns="
                               "{'user': ..., 'item': ..., 'time': ...}")
        return out
    ncol = len(first)
    out = {"user": 0, "item": 1}
    sample = rows[:200]
    for j in range(2, ncol):
        vals = [r[j] for r in sample if len(r) > j]
        if vals and "action" not in out and all(_is_action(v) for v in vals):
            out["action"] = j
    for j in reversed(range(2, ncol)):
        vals = [r[j] for r in sample if len(r) > j]
        if vals and all(_is_num(v) for v in vals):
            arr = np.array([float(v) for v in vals])
            if np.median(np.abs(arr)) > 1e8:  # epoch seconds after 1973 or larger units
                out["time"] = j
                break
    return out


def _is_action(v: str) -> bool:
    try:
        canonical_action(v)
        return True
    except DatasetError:
        return False


def load_csv(path: str | Path, *, columns: dict[str, str | int] | None = None, delimiter: str | None = None,
             header: bool | None = None, time_unit: str = "auto", action_map: dict[str, str] | None = None,
             default_action: str = "view", lenient: bool = False, name: str | None = None,
             encoding: str = "utf-8", min_events: int = 1, max_rows: int | None = None,
             item_order: list[str] | None = None) -> Dataset:
    """Load a delimited event file into a :class:`Dataset` (see the module doc for detection rules).

    ``columns`` maps roles (``user``, ``item``, ``time``, ``action``, ``device``, ``location``,
    ``category``) to a header name or a 0-based index; ``time_unit`` is ``auto``, ``s``, ``ms``,
    ``us``, ``ns`` or ``iso``; ``action_map`` maps raw action values to canonical names (else
    :func:`canonical_action` aliases apply; without an action column every event is
    ``default_action``); users with fewer than ``min_events`` rows are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not {encoding} text at byte {e.start}; pass encoding=") from None
    truncated_tail = len(text) > 0 and not text.endswith("\n")
    lines = text.splitlines()
    if max_rows is not None:
        lines = lines[: max_rows + 1]
        truncated_tail = False
    if not lines:
        raise DatasetError(f"{path}: empty file")
    delim = delimiter if delimiter is not None else sniff_delimiter(lines[:50])
    if delim in (" ", "whitespace"):
        delim = "ws"
    rows = _split_lines(lines, delim)
    first = rows[0]
    if header is None:
        names = {_norm(h) for h in first}
        known = set().union(*SYNONYMS.values())
        nonnum_first = [j for j, v in enumerate(first) if not _is_num(v)]
        below_num = any(all(_is_num(r[j]) for r in rows[1:20] if len(r) > j) for j in nonnum_first) \
            if len(rows) > 1 else False
        header = bool(names & known) or (bool(nonnum_first) and below_num)
    body_start = 1 if header else 0
    # --- resolve the column mapping to indices
    if columns is None:
        colidx = _guess_columns(first, rows[body_start:], bool(header))
    else:
        colidx = {}
        for role, c in columns.items():
            if role not in ROLES:
                raise DatasetError(f"unknown column role {role!r}; roles are {ROLES}")
            if c is None:
                continue
            if isinstance(c, int):
                colidx[role] = c
            elif header:
                hdr = [h.strip() for h in first]
                if c in hdr:
                    colidx[role] = hdr.index(c)
                elif _norm(c) in [_norm(h) for h in hdr]:
                    colidx[role] = [_norm(h) for h in hdr].index(_norm(c))
                else:
                    raise DatasetError(f"{path}: column {c!r} (for {role}) not in header {hdr}")
            elif str(c).isdigit():
                colidx[role] = int(c)
            else:
                raise DatasetError(f"{path}: column {c!r} given by name but the file has no header; "
                                   "use a 0-based index")
        if "user" not in colidx or "item" not in colidx:
            raise DatasetError(f"columns= must name at least 'user' and 'item', got {columns}")
    need = max(colidx.values()) + 1
    # --- collect columns, validating row shape
    cols: dict[str, list[str]] = {r: [] for r in colidx}
    lineno: list[int] = []
    skipped: list[str] = []
    dropped_tail = 0
    last = len(rows) - 1

    def bad(i: int, msg: str) -> None:
        nonlocal dropped_tail
        where = f"{path}:{i + 1}"
        if truncated_tail and i == last:
            dropped_tail = 1
            return
        if not lenient:
            raise DatasetError(f"{where}: {msg}")
        skipped.append(f"{where}: {msg}")

    for i in range(body_start, len(rows)):
        r = rows[i]
        if not r or (len(r) == 1 and not r[0].strip()):
            continue
        if len(r) < need:
            bad(i, f"expected at least {need} fields, got {len(r)}: {lines[i]!r}")
            continue
        u, it = r[colidx["user"]].strip(), r[colidx["item"]].strip()
        if not u or not it:
            bad(i, f"empty {'user' if not u else 'item'} value in {lines[i]!r}")
            continue
        for role, j in colidx.items():
            cols[role].append(r[j].strip())
        lineno.append(i)
    n = len(lineno)
    if n == 0:
        raise DatasetError(f"{path}: no usable rows")
    keep = np.ones(n, bool)

    def reject(k: int, role: str, val: str, why: str) -> None:
        i = lineno[k]
        where = f"{path}:{i + 1}"
        if truncated_tail and i == last:
            nonlocal dropped_tail
            dropped_tail = 1
        elif not lenient:
            raise DatasetError(f"{where}: bad {role} value {val!r}: {why}")
        else:
            skipped.append(f"{where}: bad {role} value {val!r}: {why}")
        keep[k] = False

    # --- time
    ts_ms = None
    unit = None
    if "time" in colidx:
        tv = cols["time"]
        unit = time_unit
        vals = np.full(n, np.nan)
        if unit != "iso":
            for k, v in enumerate(tv):
                try:
                    vals[k] = float(v)
                except ValueError:
                    pass
            numeric = np.isfinite(vals)
            if unit == "auto" and numeric.sum() < 0.5 * n:
                unit = "iso"
        if unit == "iso":
            for k, v in enumerate(tv):
                try:
                    vals[k] = _parse_iso(v)
                except ValueError:
                    reject(k, "time", v, "not an ISO-8601 date-time")
            factor = 1.0
        else:
            for k in np.flatnonzero(~np.isfinite(vals)).tolist():
                reject(k, "time", tv[k], "not a number")
            if unit == "auto":
                unit = time_unit_of(vals[keep])
            if unit not in _TO_MS:
                raise DatasetError(f"time_unit must be auto/s/ms/us/ns/iso, got {time_unit!r}")
            factor = _TO_MS[unit]
        ts_ms = np.round(np.where(keep, vals, 0.0) * factor).astype(np.int64)
    # --- actions
    acts = None
    if "action" in colidx:
        amap = {k.strip().lower(): v for k, v in (action_map or {}).items()}
        cache: dict[str, int] = {}
        acts = np.zeros(n, np.uint8)
        for k, v in enumerate(cols["action"]):
            a = cache.get(v)
            if a is None:
                try:
                    a = ACTION_INDEX[canonical_action(amap.get(v.lower(), v))]
                except DatasetError as e:
                    reject(k, "action", v, str(e))
                    continue
                cache[v] = a
            acts[k] = a
    elif default_action:
        acts = np.full(n, ACTION_INDEX[canonical_action(default_action)], np.uint8)
    sel = np.flatnonzero(keep)
    if min_events > 1:
        u_arr = np.asarray(cols["user"])[sel]
        _, inv, cnt = np.unique(u_arr, return_inverse=True, return_counts=True)
        sel = sel[cnt[inv] >= min_events]
    meta = {"path": str(path), "delimiter": "whitespace" if delim == "ws" else delim, "header": bool(header),
            "columns": colidx, "time_unit": unit, "rows": int(sel.size), "skipped_rows": len(skipped),
            "skipped_examples": skipped[:5], "dropped_truncated_last_line": dropped_tail}
    if sel.size == 0:
        raise DatasetError(f"{path}: no rows left after filtering (min_events={min_events})")
    acts_sel = None if acts is None else acts[sel]
    return dataset_from_columns(
        name or f"csv:{path.name}", _sub(cols["user"], sel), _sub(cols["item"], sel),
        None if ts_ms is None else ts_ms[sel], acts_sel,
        _sub(cols.get("device"), sel), _sub(cols.get("location"), sel), _sub(cols.get("category"), sel),
        meta=meta, has_actions="action" in colidx and len(np.unique(acts_sel)) > 1,
        item_order=item_order)


def _sub(c, sel):
    if c is None:
        return None
    return [c[k] for k in sel.tolist()]


def load_sequence_lines(path: str | Path, *, name: str | None = None) -> Dataset:
    """``user item1 item2 ...`` per line (S3-Rec / ICLRec format), oldest item first, no time."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    users, items = [], []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DatasetError(f"{path}:{i + 1}: expected 'user item1 item2 ...', got {line.rstrip()!r}")
            users.extend([parts[0]] * (len(parts) - 1))
            items.extend(parts[1:])
    return dataset_from_columns(name or path.name, users, items, None,
                                meta={"path": str(path), "format": "sequence-lines"})


def load_parquet(path: str | Path, **opts) -> Dataset:
    """Parquet through pyarrow (optional dependency): converted to CSV text, then :func:`load_csv`."""
    try:
        import pyarrow.parquet as pq  # noqa: F401
        import pyarrow.csv as pacsv
    except ImportError:
        raise DatasetError(f"reading {path} needs pyarrow, which is not installed: "
                           "`pip install pyarrow`, or convert the file to CSV and use csv:PATH") from None
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    import tempfile

    table = pq.read_table(path)
    with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as tmp:
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        tmp.write(buf.getvalue())
    try:
        opts.setdefault("name", f"parquet:{path.name}")
        return load_csv(tmp.name, header=True, delimiter=",", **opts)
    finally:
        Path(tmp.name).unlink(missing_ok=True)
