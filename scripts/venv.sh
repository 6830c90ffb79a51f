#!/usr/bin/env bash
# Create (once) the virtualenv for this checkout, cached outside the clone and keyed by the pins.
# Prints the venv path. Heavy wheels (torch is a multi-GB CUDA build on PyPI) stay in pip's cache
# and in the keyed venv, so a repeat run costs seconds; a fresh machine builds it from scratch.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${NEXTACTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nextaction}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"' >&2
key=$( (cat "$here/requirements.lock"; "$py" -VV) | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv (first run on this machine: downloads torch and friends)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools==84.2.1 wheel==0.48.0 >&2
  # --no-deps: the lock is the whole resolved set (one package declares a dependency we do not use)
  "$venv/bin/python" -m pip install -q --progress-bar off --no-deps -r "$here/requirements.lock" >&2
  touch "$venv/.complete"
fi
# Point the editable install at this checkout (cheap; a clone elsewhere re-points it).
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" >&2
ln -sfn "$venv" "$here/.venv"
echo "$venv"
