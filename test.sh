#!/usr/bin/env bash
# One command: set up .venv (first run), then run the whole test suite. Extra flags go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_env.sh" requirements-test.txt
cd "$here"
exec "$here/.venv/bin/python" -m pytest -q "$@" tests
