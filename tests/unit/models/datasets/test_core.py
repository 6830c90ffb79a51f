"""models.datasets.core: where the datasets are found, and the splits."""

from __future__ import annotations

import pytest

from models.datasets import Dataset, datasets_root, fit_sequences, leave_one_out, prefix_cases, session_split
from models.datasets.core import dataset_from_columns
from models.errors import DatasetError


def test_datasets_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXTACTION_DATASETS", str(tmp_path))
    assert datasets_root() == tmp_path
    monkeypatch.delenv("NEXTACTION_DATASETS")
    assert datasets_root().parts[-2:] == ("shared", "datasets")
    assert datasets_root(tmp_path / "x") == tmp_path / "x"



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
