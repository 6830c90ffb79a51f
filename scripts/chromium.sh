#!/usr/bin/env bash
# Print the path of a Chromium binary from Debian's packages, installing it first when it is missing
# (the dashboard's browser test: tests/integration/test_dashboard.py). Installs with apt-get as root
# (or passwordless sudo): `chromium` and `fonts-liberation` (text in the screenshots), without the
# ~100 other recommended packages; the .debs are kept in ~/.cache/nextaction/apt (outside the clone,
# like the venv and the Kafka jars), so a reinstall on a fresh checkout downloads nothing.
# Exit status 1, with the reason on stderr, when there is no Chromium and it cannot be installed.
set -euo pipefail

find_chromium() {
  local c
  for c in "${NEXTACTION_CHROMIUM:-}" chromium chromium-browser /usr/lib/chromium/chromium; do
    [ -n "$c" ] && command -v "$c" 2>/dev/null && return 0
  done
  return 1
}

if find_chromium; then
  exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "chromium.sh: no chromium, and this user cannot install it (not root, no passwordless sudo): as root," \
      "apt-get install chromium" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "chromium.sh: no chromium and no apt-get (Debian's packages are needed): install chromium" >&2
  exit 1
fi

archives=${NEXTACTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nextaction}/apt
mkdir -p "$archives/partial"
install() {
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
    -o Dir::Cache::archives="$archives" -o APT::Sandbox::User=root chromium fonts-liberation >&2
}
echo "chromium.sh: installing chromium from Debian's packages (.debs cached in $archives)" >&2
# a fresh machine has empty package lists (or stale ones whose .debs are gone): update, then retry
if ! install; then
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q >&2
  install
fi
find_chromium || { echo "chromium.sh: chromium was installed but no binary was found" >&2; exit 1; }
