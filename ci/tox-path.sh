# shellcheck shell=bash
# ci/tox-path.sh — put every pyenv-installed CPython on PATH so tox finds py39 ... py313.
#
#   source ci/tox-path.sh && tox -e py39,py313
#
# pyenv's shims only run the *active* versions, so tox (virtualenv discovery) would miss the
# others; this prepends $PYENV_ROOT/versions/X.Y.Z/bin (newest patch release of each minor first)
# where the real python3.X binaries live. Harmless without pyenv.
_isolate_pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
if [[ -d $_isolate_pyenv_root/versions ]]; then
  # shellcheck disable=SC2010 # version directory names are plain X.Y.Z
  for _isolate_v in $(ls "$_isolate_pyenv_root/versions" | grep -E '^3\.[0-9]+\.[0-9]+$' | sort -V); do
    case ":$PATH:" in
      *":$_isolate_pyenv_root/versions/$_isolate_v/bin:"*) ;;
      *) PATH=$_isolate_pyenv_root/versions/$_isolate_v/bin:$PATH ;;
    esac
  done
  export PATH
fi
unset _isolate_pyenv_root _isolate_v
