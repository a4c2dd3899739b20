#!/usr/bin/env bash
# Creates .venv on first use and keeps it in step with requirements*.txt. Sourced by gui.sh and test.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
# pip's own messages, without the machine's notes about package-index folders that do not exist
quiet_pip() { "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:.* is ignored" || true; }; }
want="${1:-requirements.txt}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
  quiet_pip install -q --disable-pip-version-check --upgrade pip
fi
stamp="$venv/.installed-$(basename "$want")"
hash=$(cat "$here"/requirements*.txt "$here/setup.py" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ]; then
  echo "[setup] installing $want into $venv (first run takes a few minutes)"
  quiet_pip install -q --disable-pip-version-check -r "$here/$want"
  # setuptools warns that an editable install lets same-named folders in the working directory win imports: that
  # is the point of it here (the checkout is the package), so the warning is silenced.
  PYTHONWARNINGS=ignore quiet_pip install -q --disable-pip-version-check --no-deps -e "$here"
  echo "$hash" > "$stamp"
fi
