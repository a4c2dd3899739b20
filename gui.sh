#!/usr/bin/env bash
# One command: set up .venv (first run) and start the GUI. Extra flags go to kohya_gui.py (see --help).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_env.sh" requirements.txt
exec "$here/.venv/bin/python" "$here/kohya_gui.py" "$@"
