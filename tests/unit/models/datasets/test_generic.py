"""models.datasets.generic: any CSV (header and delimiter detection, column mapping, time units,
malformed rows) and parquet."""

from __future__ import annotations

import pytest

from models.datasets import load, load_csv
from models.schema import ACTION_INDEX
from models.errors import DatasetError


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
