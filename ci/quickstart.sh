#!/usr/bin/env bash
# ci/quickstart.sh — the README's first command: see isolation at work.
#
#   bash ci/quickstart.sh [pytest args...]
#
# Sets up .venv exactly like ci/test.sh (same knobs: PYTHON=, ISOLATE_VENV=), prints
# what this host can isolate (`python -m pytest_isolate doctor`), then runs the example
# suite in examples/ verbosely: `python -m pytest examples -v -rA`.
# Exit status is the example run's (the doctor report is informational).
set -uo pipefail
ISOLATE_SCRIPT=ci/quickstart.sh
# shellcheck source=ci/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ISOLATE_REPO" || exit 1

isolate_venv_setup || exit 1

echo
echo "=== python -m pytest_isolate doctor ==="
"$ISOLATE_PY" -m pytest_isolate doctor
doctor_rc=$?
[[ $doctor_rc -eq 0 ]] || isolate_log "note: doctor exited $doctor_rc (see its report above)"

echo
echo "=== python -m pytest examples -v -rA ==="
"$ISOLATE_PY" -m pytest examples -v -rA "$@"
