"""stream_app.cli.offline: ``nextaction train`` and ``evaluate`` — the real commands, their help and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # trains a model (about 2 s)
def test_train_and_evaluate_run_the_real_commands(cli, tmp_path):
    out = tmp_path / "ckpt"
    res = cli("train", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--budget-min", "0.2",
              "--threads", "1")
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists() and (out / "model.safetensors").exists()
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
