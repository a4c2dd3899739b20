#!/usr/bin/env bash
# One command: set up .venv (first run), then run the whole test suite. Extra flags go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_env.sh" requirements-test.txt
# The GUI browser test drives the system Chromium (playwright cannot download browsers offline); it is skipped
# when Chromium is missing and cannot be installed (no root / no package mirror).
command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
    echo "test.sh: chromium not installed; the browser test will be skipped" >&2
cd "$here"
# Two workers (the CI box has two cores; much of the suite waits on subprocesses and the browser), each taking
# whole test modules so that a module's fixtures (tiny models, a GUI server) are built once.
exec "$here/.venv/bin/python" -m pytest -q -n 2 --dist loadscope "$@" tests
