"""Remove a directory tree, also one an overlay mount left behind (the factory's, so: light imports)."""

from __future__ import annotations

import os
import shutil
import stat


def remove_tree(path: str) -> None:
    """rm -rf that also gets through overlayfs's mode-000 work directories."""

    def fix(func: object, p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)

    shutil.rmtree(path, onerror=fix)  # noqa: B028 - onexc needs 3.12
