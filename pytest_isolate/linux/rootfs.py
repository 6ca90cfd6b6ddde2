"""Build the sandbox root from a plan, inside a fresh mount namespace (the bubblewrap sequence).

1. propagation MS_REC|MS_SLAVE on ``/`` before any mount, so nothing leaks back to the host;
2. a size-capped scratch tmpfs on ``/tmp``, then ``pivot_root`` into it: the host tree moves to
   ``/oldroot`` *without* the tmpfs on top of its ``/tmp``, so host ``/tmp`` can be a lower layer;
3. ``/newroot`` is assembled from overlays (upper/work in the scratch), recursive binds and a fresh
   ``/proc``; ``writable`` host paths are bound read-write on top;
4. ``pivot_root(".", ".")`` in ``/newroot`` and a lazy unmount of the old root.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs the factory 1.1 MB of heap: see record.py
if TYPE_CHECKING:
    from typing import Callable, Optional, Sequence

from . import libc
from .mounts import Step
from .record import record

STAGE = "/tmp"
OLD = "/oldroot"
NEW = "/newroot"
SCRATCH = "/scratch"
LOWER = "/lower"


@record(frozen=True)
class RootOptions:
    """How to build the root: which layers, and where the upper layers live."""

    steps: Sequence[Step]
    writable: Sequence[str] = ()
    scratch_size: str = "50%"
    userxattr: bool = False
    # Host directories for upper layers when tmpfs lacks user xattrs (< 6.6). Overlayfs refuses an
    # upper inside its own lower ("overlapping layers"), so each overlay takes the first base that
    # is not below its lower directory: give two bases in different trees.
    upper_bases: tuple[str, ...] = ()
    # An image instead of the host tree (step "image"): host directories stacked as overlay lower
    # layers, topmost first; and host files or directories bound (read-write) at sandbox paths.
    layers: tuple[str, ...] = ()
    binds: tuple[tuple[str, str], ...] = ()


def _escape(path: str) -> str:
    # overlayfs splits its options on ',' and lowerdir on ':'
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _mountpoint(path: str) -> None:
    """Make sure directory ``path`` exists; its parent nearly always does (steps go top down)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


def _copy_mode(src: str, dst: str) -> None:
    st = os.stat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    try:
        os.chown(dst, st.st_uid, st.st_gid)
    except OSError:
        pass  # rootless: the owner may be unmapped; the mode still matters most (e.g. /tmp's 1777)


class _Builder:
    def __init__(self, opts: RootOptions, mount_proc: bool) -> None:
        self.opts = opts
        self.layers = 0
        self.mount_proc = mount_proc
        # the directories of the scratch tmpfs that any write into the root changes (mtime or
        # ctime): every upper layer's top and every plain directory of the tree (see watched)
        self.watched: list[str] = [NEW]

    def scratch_for(self, *lowers: str) -> str:
        """Where the upper layer of an overlay of ``lowers`` goes: never inside one of them."""
        for base in self.opts.upper_bases:
            if not any((base + "/").startswith(lower.rstrip("/") + "/") for lower in lowers):
                return OLD + base
        if self.opts.upper_bases:
            raise OSError(22, f"no upper layer base outside {', '.join(lowers)} (bases: {', '.join(self.opts.upper_bases)})")
        return SCRATCH

    def upper_and_work(self, scratch: str) -> tuple[str, str]:
        """Fresh upper and work directories of the next overlay, side by side under ``scratch``:
        two mkdirs, as this runs once per overlay (some 45 times per rootless sandbox here)."""
        self.layers += 1
        upper, work = f"{scratch}/{self.layers}.upper", f"{scratch}/{self.layers}.work"
        try:
            os.mkdir(upper)
        except FileNotFoundError:  # a base on disk made for this sandbox
            os.makedirs(upper)
        os.mkdir(work)
        self.watched.append(upper)
        return upper, work

    def overlay(self, path: str) -> None:
        lower, target = OLD + path, NEW + path
        upper, work = self.upper_and_work(self.scratch_for(path))
        _copy_mode(lower, upper)
        _mountpoint(target)
        data = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)}"
        if self.opts.userxattr:
            data += ",userxattr"
        try:
            libc.mount("overlay", target, "overlay", 0, data)
        except OSError as exc:
            raise OSError(exc.errno, f"overlay of {path}: {exc.strerror}") from exc

    def rootlayer(self) -> None:
        """The whole root filesystem as one overlay: its lower is a non-recursive bind of ``/``."""
        os.mkdir(LOWER)
        libc.mount(OLD, LOWER, None, libc.MS_BIND)
        upper, work = self.upper_and_work(SCRATCH)
        _copy_mode(OLD, upper)
        libc.mount("overlay", NEW, "overlay", 0, f"lowerdir={LOWER},upperdir={upper},workdir={work}")

    def image(self) -> None:
        """The root is the image's layers, copy-on-write (an upper may not sit inside a layer)."""
        upper, work = self.upper_and_work(self.scratch_for(*self.opts.layers))
        os.chmod(upper, 0o755)
        # mount(2) takes one page of options: name cached layers relative to their common directory
        parents = {os.path.dirname(layer) for layer in self.opts.layers}
        common = OLD + parents.pop() if len(parents) == 1 else ""
        names = [os.path.basename(layer) if common else OLD + layer for layer in self.opts.layers]
        data = f"lowerdir={':'.join(_escape(n) for n in names)},upperdir={_escape(upper)},workdir={_escape(work)}"
        if self.opts.userxattr:
            data += ",userxattr"
        try:
            if common:
                os.chdir(common)
            libc.mount("overlay", NEW, "overlay", 0, data)
        except OSError as exc:
            raise OSError(exc.errno, f"overlay of the image's {len(self.opts.layers)} layers: {exc.strerror}") from exc
        finally:
            os.chdir("/")

    def bind(self, source: str, target: str) -> None:
        """Bind a host path (file or directory) at ``target``, creating the mount point."""
        dst = NEW + target
        if os.path.isdir(OLD + source):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.lexists(dst):
                os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        libc.mount(OLD + source, dst, None, libc.MS_BIND | libc.MS_REC)

    def rbind(self, path: str, target: str = "") -> None:
        dst = NEW + (target or path)
        if os.path.isdir(OLD + path):
            os.makedirs(dst, exist_ok=True)
        else:  # no text-mode open(): after pivot_root a codec lookup could not import anything
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        libc.mount(OLD + path, dst, None, libc.MS_BIND | libc.MS_REC)

    def readonly_file(self, path: str) -> None:
        self.rbind(path)
        flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
        try:
            libc.mount(None, NEW + path, None, flags)
        except OSError:
            pass  # a locked mount keeps its flags; reading is what matters

    def step(self, s: Step) -> None:
        if s.action == "rootlayer":
            self.rootlayer()
        elif s.action == "image":
            self.image()
        elif s.action == "dir":
            os.makedirs(NEW + s.path, exist_ok=True)
            _copy_mode(OLD + s.path, NEW + s.path)
            self.watched.append(NEW + s.path)
        elif s.action == "overlay":
            self.overlay(s.path)
        elif s.action == "rbind":
            self.rbind(s.path)
        elif s.action == "file":
            self.readonly_file(s.path)
        elif s.action == "symlink":
            os.symlink(s.target, NEW + s.path)
        elif s.action == "proc":
            os.makedirs(NEW + s.path, exist_ok=True)
            if self.mount_proc:
                libc.mount("proc", NEW + s.path, "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
        else:
            raise ValueError(f"unknown root step {s.action!r}")


def proc_points(opts: RootOptions) -> tuple[str, ...]:
    """Where the root gets a fresh ``/proc``."""
    return tuple(s.path for s in opts.steps if s.action == "proc")


def build_root(opts: RootOptions, mount_proc: bool = True, before_pivot: Optional[Callable[[], None]] = None,
               pivot: bool = True) -> tuple[str, ...]:
    """Replace this mount namespace's root by the copy-on-write view. A ``/proc`` shows the PID
    namespace of the process that mounts it: call as PID 1 of the sandbox, or without
    ``mount_proc`` (mount points made, nothing mounted: :func:`proc_points` says where) from
    outside it. ``before_pivot`` runs when the new root is complete under ``NEW`` and the host's
    tree is still attached: in a user namespace the kernel mounts a new ``/proc`` only while a
    fully visible one is in the mount namespace.

    Without ``pivot`` it stops there (a template: see :func:`enter_root`) and returns the
    directories, in that staging root, whose mtime and ctime a write anywhere in the new root
    changes: the top of each upper layer, each plain directory of the tree, ``NEW`` itself."""
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_SLAVE)
    libc.mount("tmpfs", STAGE, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, f"mode=755,size={opts.scratch_size}")
    for d in (NEW, OLD, SCRATCH):
        os.mkdir(STAGE + d)
    libc.pivot_root(STAGE, STAGE + OLD)
    os.chdir("/")
    libc.mount(NEW, NEW, None, libc.MS_BIND)
    _copy_mode(OLD, NEW)
    builder = _Builder(opts, mount_proc)
    for s in opts.steps:
        builder.step(s)
    for path in opts.writable:
        if opts.layers:
            os.makedirs(NEW + path, exist_ok=True)
        libc.mount(OLD + path, NEW + path, None, libc.MS_BIND | libc.MS_REC)
    for source, target in opts.binds:
        builder.bind(source, target)
    if not pivot:
        return tuple(builder.watched)
    if before_pivot is not None:
        before_pivot()
    enter_root()
    return ()


def enter_root() -> None:
    """The last step of building a root: ``NEW`` becomes ``/`` and the host's tree goes. Also the
    one step a sandbox made from a template takes itself, in its copy of the template's mount
    namespace (the copy's mounts are its own: the template stays as it was)."""
    os.chdir(NEW)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
