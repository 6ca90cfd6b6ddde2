# shellcheck shell=bash
# ci/venv.sh — sourced by ci/test.sh and ci/quickstart.sh (not run on its own).
#
# Creates or reuses the project's virtualenv and installs the project into it with
# `pip install -e '.[test]'`. After sourcing, call `isolate_venv_setup`; it sets
#   ISOLATE_PY   the virtualenv's python (use it for every command)
#
# Knobs (environment):
#   PYTHON=/path/to/python   interpreter to build the virtualenv from (default: the
#                            newest of python3.13/3.12/3.11 on PATH, then python3,
#                            python3.10, python3.9)
#   ISOLATE_VENV=DIR         where the virtualenv lives (default: .venv in the repo)
#   ISOLATE_NO_INSTALL=1     reuse the virtualenv as it is, skip `pip install`

ISOLATE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

isolate_log() { printf '%s: %s\n' "${ISOLATE_SCRIPT:-ci}" "$*" >&2; }

# Prints "X.Y" for an interpreter, or fails if it cannot run or lacks the venv module.
isolate_py_version() {
  "$1" -c 'import sys, venv; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

isolate_supported() {  # X.Y within the supported range 3.9 .. 3.13
  local minor=${1#3.}
  [[ $1 == 3.* && $minor -ge 9 && $minor -le 13 ]]
}

# Echoes the absolute path of the interpreter to build the virtualenv from.
isolate_find_python() {
  local cand path ver
  if [[ -n ${PYTHON:-} ]]; then
    path=$(command -v "$PYTHON") || { isolate_log "PYTHON=$PYTHON: not found"; return 1; }
    ver=$(isolate_py_version "$path") \
      || { isolate_log "PYTHON=$PYTHON cannot run or has no venv module (Debian: apt-get install python3-venv)"; return 1; }
    isolate_supported "$ver" || isolate_log "warning: PYTHON=$PYTHON is Python $ver; supported are 3.9-3.13"
    echo "$path"; return 0
  fi
  # pyenv shims exist for every installed version but fail unless that version is
  # active, so each candidate is actually run, not just looked up.
  for cand in python3.13 python3.12 python3.11 python3 python3.10 python3.9; do
    path=$(command -v "$cand") || continue
    ver=$(isolate_py_version "$path") || continue
    isolate_supported "$ver" && { echo "$path"; return 0; }
  done
  isolate_log "no usable Python 3.9-3.13 with the venv module on PATH; set PYTHON=/path/to/python3"
  isolate_log "(Debian/Ubuntu: apt-get install python3 python3-venv)"
  return 1
}

isolate_venv_setup() {
  local venv=${ISOLATE_VENV:-$ISOLATE_REPO/.venv} base want have
  if [[ -x $venv/bin/python ]] && have=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    # Reuse, unless PYTHON asks for a different version than the one it was built with.
    if [[ -n ${PYTHON:-} ]]; then
      base=$(isolate_find_python) || return 1
      want=$(isolate_py_version "$base")
      if [[ $want != "$have" ]]; then
        isolate_log "$venv is Python $have but PYTHON=$PYTHON is $want: recreating it"
        rm -rf "$venv"
      fi
    fi
  elif [[ -e $venv ]]; then
    isolate_log "$venv is broken (its python does not run; moved or built elsewhere?): recreating it"
    rm -rf "$venv"
  fi
  if [[ ! -x $venv/bin/python ]]; then
    base=$(isolate_find_python) || return 1
    isolate_log "creating $venv with $base ($(isolate_py_version "$base"))"
    "$base" -m venv "$venv" || { isolate_log "python -m venv failed (Debian: apt-get install python3-venv)"; return 1; }
  fi
  ISOLATE_PY=$venv/bin/python
  if [[ ${ISOLATE_NO_INSTALL:-0} != 1 ]]; then
    isolate_log "pip install -e '.[test]' into $venv"
    (cd "$ISOLATE_REPO" && "$ISOLATE_PY" -m pip install --quiet --disable-pip-version-check -e '.[test]') \
      || { isolate_log "pip install -e '.[test]' failed"; return 1; }
  fi
  isolate_log "using $("$ISOLATE_PY" -c 'import sys; print(sys.version.split()[0])') in $venv"
}
