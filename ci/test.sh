#!/usr/bin/env bash
# ci/test.sh — the developer test command (README quick start); CI runs exactly this.
#
#   bash ci/test.sh [pytest args...]        e.g.  bash ci/test.sh -x -k overlay
#
# 1. creates (or reuses) the virtualenv .venv in the repo ($ISOLATE_VENV if set) with
#    the newest Python 3.11+ found on PATH (else 3.9/3.10; override with PYTHON=...),
# 2. pip install -e '.[test]',
# 3. python -m mypy pytest_isolate   (strict; configuration in pyproject.toml),
# 4. python -m pytest tests "$@".
# Both 3 and 4 always run. Exit status: pytest's if it failed (5 = no tests collected),
# else mypy's, else 0. Set PYTEST_ISOLATE_MUST_WORK=1 to turn "host lacks feature X"
# skips into failures (CI does).
set -uo pipefail
ISOLATE_SCRIPT=ci/test.sh
# shellcheck source=ci/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ISOLATE_REPO" || exit 1

isolate_venv_setup || exit 1

isolate_log "python -m mypy pytest_isolate"
"$ISOLATE_PY" -m mypy pytest_isolate
mypy_rc=$?

isolate_log "python -m pytest tests $*"
"$ISOLATE_PY" -m pytest tests "$@"
pytest_rc=$?

isolate_log "mypy exit $mypy_rc, pytest exit $pytest_rc"
if [[ $pytest_rc -ne 0 ]]; then exit "$pytest_rc"; fi
exit "$mypy_rc"
