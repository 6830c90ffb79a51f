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
