"""Turn a ``rootfs=`` argument into overlayfs lower layers, unpacked once into a per-user cache.

A plain directory is used as it is. An OCI image layout (a directory, or a tar of one), a
``docker save`` archive or a root filesystem tarball is unpacked layer by layer into
``<cache>/layers/<sha256>``, keyed by the hash of the layer blob as stored, so images that share a
base layer share its directory. The result is in ``lowerdir=`` order: topmost layer first.

Why our own extraction loop: ``TarFile.extractall`` follows symlinks planted by earlier members
(before 3.12's ``filter=``), knows nothing of whiteouts and cannot leave read-only directories for
last. Here every write walks its path from the layer root with ``O_NOFOLLOW``.

A layer is unpacked into a temporary sibling and renamed into place while holding an ``flock`` on
``<key>.lock`` (pytest-xdist workers unpack the same image at once); it is never modified after.
Whiteouts become what overlayfs reads: ``.wh.name`` a 0:0 character device (no CAP_MKNOD needed
since Linux 5.8), ``.wh..wh..opq`` the ``overlay.opaque`` xattr, ``trusted.`` for a mount by real
root, ``user.`` for a mount with ``userxattr`` in a user namespace: the two flavours have separate
keys (``<sha256>``, ``<sha256>-u``). Whiteouts are written in a bottom layer too, where overlayfs
hides them just the same, so a layer's directory does not depend on its position in an image.

A tarball is hashed once; ``<cache>/archives/`` remembers its layers by (path, device, inode, size,
mtime, ctime), so later sessions neither read nor hash it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from typing import IO, Any, Callable, Iterator, Optional, Protocol

MAX_LAYERS = 500  # overlayfs refuses a deeper stack (OVL_MAX_STACK)
NOT_AN_IMAGE = "not a directory, tar archive, OCI layout or docker-save archive"

LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
_HEX = re.compile(r"[0-9a-f]{64}\Z")
_KEY = re.compile(r"[0-9a-f]{64}(-u)?\Z")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BAD_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Opener = Callable[[], IO[bytes]]


class ImageError(ValueError):
    """A rootfs argument that is not usable; the message names the path and what is wrong."""


def default_cache_dir() -> str:
    """$PYTEST_ISOLATE_CACHE, else $XDG_CACHE_HOME/pytest-isolate/images, else ~/.cache/pytest-isolate/images."""
    explicit = os.environ.get("PYTEST_ISOLATE_CACHE")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")  # XDG: relative = unset
    return os.path.join(base, "pytest-isolate", "images")


def resolve_rootfs(source: str | os.PathLike[str], cache_dir: str, *, userxattr: bool) -> tuple[str, ...]:
    """Lower layer directories for `source`, topmost first."""
    path = os.fspath(source)
    where = f"rootfs {path!r}"
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        cache = _Cache(cache_dir, userxattr)
        if stat.S_ISDIR(st.st_mode):
            if not os.path.lexists(os.path.join(real, "oci-layout")):
                return (real,)
            return _oci(_DirStore(real), cache, where)
        if stat.S_ISREG(st.st_mode):
            return _tarball(real, st, cache, where)
    except OSError as exc:  # the boundary: whatever the cause, name the rootfs
        raise ImageError(f"{where}: {_describe(exc, real)}") from exc
    raise ImageError(f"{where}: {NOT_AN_IMAGE}")


def _describe(exc: OSError, real: str) -> str:
    text = exc.strerror or str(exc)
    text = text[:1].lower() + text[1:]
    return f"{text}: {exc.filename!r}" if exc.filename and exc.filename != real else text


# --- sources of blobs: an OCI layout directory, or a tar archive read with random access ---


class _Store(Protocol):
    def open(self, name: str) -> IO[bytes]:
        """The blob or file ``name`` of the image; KeyError when it is missing."""


class _DirStore:
    def __init__(self, root: str) -> None:
        self.root = root

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(os.path.join(self.root, name), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(name) from None


class _TarStore:
    def __init__(self, tar: tarfile.TarFile, where: str) -> None:
        self.tar = tar
        self.members = {"/".join(_split(m.name, where)): m for m in tar.getmembers()}

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(name)
        try:
            data = self.tar.extractfile(member) if member is not None else None
        except KeyError:  # a link to a missing member
            data = None
        if data is None:
            raise KeyError(name)
        return data


def _read(store: _Store, name: str, where: str) -> bytes:
    try:
        with store.open(name) as f:
            return f.read()
    except KeyError:
        raise ImageError(f"{where}: {name} is missing") from None


def _json(data: bytes, name: str, where: str, kind: type) -> Any:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{where}: {name} is not valid JSON: {exc}") from None
    if not isinstance(doc, kind):
        raise ImageError(f"{where}: {name} is not a JSON {'object' if kind is dict else 'list'}")
    return doc


# --- OCI image layout and docker save ---


def _digest(desc: Any, where: str) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    algo, _, hexdigest = str(digest).partition(":")
    if algo != "sha256" or not _HEX.match(hexdigest):
        raise ImageError(f"{where}: unsupported or malformed digest {digest!r}")
    return hexdigest


def _blob(store: _Store, desc: Any, where: str) -> Any:
    hexdigest = _digest(desc, where)
    name = f"blobs/sha256/{hexdigest}"
    data = _read(store, name, where)
    got = hashlib.sha256(data).hexdigest()
    if got != hexdigest:
        raise ImageError(f"{where}: {name}: digest mismatch (content is sha256:{got})")
    return _json(data, name, where, dict)


def _pick(index: dict[str, Any], name: str, where: str) -> Any:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{where}: {name} lists no manifests")
    if len(manifests) == 1:
        return manifests[0]
    machine = os.uname().machine
    arch = _GOARCH.get(machine, machine)
    found = []
    for desc in manifests:
        platform = desc.get("platform") if isinstance(desc, dict) else None
        platform = platform if isinstance(platform, dict) else {}
        if (platform.get("os"), platform.get("architecture")) == ("linux", arch):
            return desc
        found.append(f"{platform.get('os')}/{platform.get('architecture')}")
    raise ImageError(f"{where}: {name} lists {len(manifests)} manifests, none for linux/{arch}: {', '.join(found)}")


def _oci(store: _Store, cache: _Cache, where: str) -> tuple[str, ...]:
    """Index → (nested index →) manifest → layers; every blob checked against its digest."""
    _json(_read(store, "oci-layout", where), "oci-layout", where, dict)
    doc = _json(_read(store, "index.json", where), "index.json", where, dict)
    for depth in range(3):
        if "layers" in doc:
            break
        if depth == 2:
            raise ImageError(f"{where}: index.json: more than one level of nested index")
        doc = _blob(store, _pick(doc, "index.json" if depth == 0 else "nested index", where), where)
    descs = doc["layers"]
    if not isinstance(descs, list):
        raise ImageError(f"{where}: the manifest's layers is not a list")
    _check_count(len(descs), where)
    blobs = []
    for desc in descs:
        media = str(desc.get("mediaType", "")) if isinstance(desc, dict) else "?"
        if "zstd" in media:
            raise ImageError(f"{where}: zstd-compressed layers ({media}) are not supported")
        if media not in LAYER_TYPES:
            raise ImageError(f"{where}: unsupported layer media type {media!r}")
        hexdigest = _digest(desc, where)
        blobs.append((hexdigest, f"blobs/sha256/{hexdigest}"))
    return _layers(store, blobs, cache, where)


def _docker(store: _Store, cache: _Cache, where: str) -> Optional[tuple[str, ...]]:
    """The legacy ``docker save`` manifest.json; None when the file is something else."""
    try:
        doc = json.loads(_read(store, "manifest.json", where))
    except ValueError:
        return None
    if not (isinstance(doc, list) and doc and isinstance(doc[0], dict) and isinstance(doc[0].get("Layers"), list)):
        return None
    names = ["/".join(_split(str(n), where, "layer path")) for n in doc[0]["Layers"]]
    _check_count(len(names), where)
    blobs = []
    for name in names:  # no digests here: the layer's key is the hash of its bytes as stored
        sha = hashlib.sha256()
        try:
            with store.open(name) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    sha.update(chunk)
        except KeyError:
            raise ImageError(f"{where}: {name} is missing") from None
        blobs.append((sha.hexdigest(), name))
    return _layers(store, blobs, cache, where)


def _layers(store: _Store, blobs: list[tuple[str, str]], cache: _Cache, where: str) -> tuple[str, ...]:
    for hexdigest, name in blobs:  # fail before unpacking anything
        if not cache.has(hexdigest):
            _read_check(store, name, where)
    dirs = [cache.layer(hexdigest, functools.partial(store.open, name), where, name) for hexdigest, name in blobs]
    return tuple(reversed(dirs))


def _read_check(store: _Store, name: str, where: str) -> None:
    try:
        store.open(name).close()
    except KeyError:
        raise ImageError(f"{where}: {name} is missing") from None


def _check_count(count: int, where: str) -> None:
    if count > MAX_LAYERS:
        raise ImageError(f"{where}: {count} layers, overlayfs stacks at most {MAX_LAYERS}")


# --- tarballs ---


def _tarball(real: str, st: os.stat_result, cache: _Cache, where: str) -> tuple[str, ...]:
    known = cache.recall(real, st)
    if known is not None:
        return known
    names, hexdigest = _scan(real, where)
    layers = None
    if names & {"oci-layout", "index.json", "manifest.json"}:
        with tarfile.open(real, "r:*") as tar:  # random access: blobs are looked up by name
            store = _TarStore(tar, where)
            if {"oci-layout", "index.json"} <= names:  # newer docker save writes both: prefer the digests
                layers = _oci(store, cache, where)
            elif "manifest.json" in names:
                layers = _docker(store, cache, where)
    if layers is None:
        layers = (cache.layer(hexdigest, lambda: open(real, "rb"), where, "the archive"),)
    cache.remember(real, st, layers)
    return layers


def _scan(real: str, where: str) -> tuple[set[str], str]:
    """Top-level names of the archive and the sha256 of its bytes, in one pass."""
    with open(real, "rb") as f:
        reader = _Hashing(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                names = set()
                for member in iter(tar.next, None):
                    names.add("/".join(_split(member.name, where)[:1]))
                    _forget_headers(tar)
        except _BAD_ARCHIVE:
            if len(reader.head) == 512 and not reader.head.strip(b"\0"):
                # only end-of-archive blocks: Python < 3.10 calls that an error, later ones no members
                raise ImageError(f"{where}: empty tar archive") from None
            if reader.head.startswith(_ZSTD_MAGIC):
                raise ImageError(f"{where}: zstd-compressed archives are not supported") from None
            raise ImageError(f"{where}: {NOT_AN_IMAGE}") from None
        if not names:
            raise ImageError(f"{where}: empty tar archive")
        return names, reader.drain()


class _Hashing(io.RawIOBase):
    """Hashes what passes through, so a blob is verified in the same pass that unpacks it."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.head = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.raw.read(len(view))
        view[: len(data)] = data
        self.sha256.update(data)
        self.head = self.head or data[:512]
        return len(data)

    def drain(self) -> str:
        """Hash the rest (tar padding, compression trailer) and return the digest of the whole."""
        for chunk in iter(lambda: self.raw.read(1 << 20), b""):
            self.sha256.update(chunk)
        return self.sha256.hexdigest()


# --- the cache ---


class _Cache:
    """``layers/<key>``: one directory per layer blob and xattr flavour, unpacked at most once."""

    def __init__(self, root: str, userxattr: bool) -> None:
        self.root = root
        self.userxattr = userxattr
        self.suffix = "-u" if userxattr else ""
        self.layers = os.path.join(root, "layers")

    def path(self, hexdigest: str) -> str:
        return os.path.join(self.layers, hexdigest + self.suffix)

    def has(self, hexdigest: str) -> bool:
        return os.path.isdir(self.path(hexdigest))

    def layer(self, hexdigest: str, opener: Opener, where: str, label: str) -> str:
        final = self.path(hexdigest)
        if os.path.isdir(final):
            return final
        os.makedirs(self.layers, mode=0o700, exist_ok=True)
        with _locked(final + ".lock"):
            if os.path.isdir(final):  # another process unpacked it while we waited
                return final
            key = os.path.basename(final)
            for stale in os.listdir(self.layers):  # left by a process killed mid-unpack; we hold its lock
                if stale.startswith(f".{key}."):
                    _rmtree(os.path.join(self.layers, stale))
            tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=self.layers)
            try:
                try:
                    raw = opener()
                except KeyError:
                    raise ImageError(f"{where}: {label} is missing") from None
                with raw:
                    _unpack_blob(raw, tmp, hexdigest, self.userxattr, f"{where}: {label}")
                os.rename(tmp, final)
            except BaseException:
                _rmtree(tmp)
                raise
        return final

    def _index(self, real: str) -> str:
        name = hashlib.sha256(os.fsencode(real)).hexdigest() + self.suffix + ".json"
        return os.path.join(self.root, "archives", name)

    def recall(self, real: str, st: os.stat_result) -> Optional[tuple[str, ...]]:
        """The layers of an archive seen before, unless it changed or a layer went missing."""
        try:
            with open(self._index(real)) as f:
                entry = json.load(f)
            if entry["path"] != real or entry["stat"] != _identity(st):
                return None
            keys = [str(k) for k in entry["layers"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(_KEY.match(k) for k in keys):
            return None
        dirs = tuple(os.path.join(self.layers, k) for k in keys)
        return dirs if dirs and all(os.path.isdir(d) for d in dirs) else None

    def remember(self, real: str, st: os.stat_result, layers: tuple[str, ...]) -> None:
        path = self._index(real)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        entry = {"path": real, "stat": _identity(st), "layers": [os.path.basename(d) for d in layers]}
        fd, tmp = tempfile.mkstemp(prefix=".", dir=os.path.dirname(path))
        with open(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)


def _identity(st: os.stat_result) -> list[int]:
    # ctime changes on any write and cannot be set back, unlike mtime
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _rmtree(path: str) -> None:
    """Remove a (partial) layer, whose directories may already be read-only."""
    for top, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(top, name)
            if not os.path.islink(sub):
                os.chmod(sub, 0o700)  # before os.walk descends into it
    shutil.rmtree(path, ignore_errors=True)


# --- unpacking one layer ---


def _split(name: str, where: str = "", what: str = "member") -> tuple[str, ...]:
    """Components of an archive path, leading '/' dropped; '..' may not climb out of the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            raise ImageError(f"{where}: {what} {name!r} escapes the layer root")
    return tuple(parts)


def _unpack_blob(raw: IO[bytes], dest: str, expected: str, userxattr: bool, where: str) -> None:
    reader = _Hashing(raw)
    problem = None
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            _Unpacker(tar, dest, userxattr, where).run()
    except _BAD_ARCHIVE as exc:
        problem = "zstd compression is not supported" if reader.head.startswith(_ZSTD_MAGIC) else f"not a tar archive ({exc})"
    got = reader.drain()
    if got != expected:  # reported first: corruption is the likelier cause of a bad archive
        raise ImageError(f"{where}: digest mismatch (expected sha256:{expected}, content is sha256:{got})")
    if problem:
        raise ImageError(f"{where}: {problem}")


def _forget_headers(tar: tarfile.TarFile) -> None:
    # Stream mode keeps every header read (``TarFile.members``, undocumented, there since 2.x): a
    # root filesystem has 10^5 of them, and none is needed again (hard links are resolved on disk).
    members: list[tarfile.TarInfo] = getattr(tar, "members", [])
    members.clear()


def _lstat(fd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _remove(fd: int, name: str) -> None:
    st = _lstat(fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
    try:
        for entry in os.scandir(sub):
            _remove(sub, entry.name)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=fd)


class _Unpacker:
    """Writes one layer's members below ``root``, never following a symlink on the way."""

    def __init__(self, tar: tarfile.TarFile, root: str, userxattr: bool, where: str) -> None:
        self.tar = tar
        self.root = root
        self.where = where
        self.opaque = "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"
        self.as_root = os.geteuid() == 0
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.skipped_devices = 0  # rootless cannot mknod; the sandbox's /dev is bound from the host

    def run(self) -> None:
        os.chmod(self.root, 0o755)  # unless the archive has a "./" entry
        while True:
            member = self.tar.next()
            if member is None:
                break
            self.member(member)
            _forget_headers(self.tar)
        # Directories last and deepest first: a read-only one may have content, and writing
        # entries changes a directory's mtime.
        for parts in sorted(self.dirs, key=len, reverse=True):
            fd = self.walk(parts, "/".join(parts))
            try:
                self.attrs(fd, self.dirs[parts])
            finally:
                os.close(fd)

    def member(self, member: tarfile.TarInfo) -> None:
        parts = _split(member.name, self.where)
        if not parts:
            if member.isdir():
                self.dirs[()] = member
            return
        fd = self.walk(parts[:-1], member.name)
        try:
            if parts[-1].startswith(".wh."):
                self.whiteout(fd, parts, member.name)
            else:
                self.create(fd, parts, member)
        finally:
            os.close(fd)

    def walk(self, parts: tuple[str, ...], name: str) -> int:
        """A descriptor of the directory ``parts``, made (mode 755) where missing, symlinks refused."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for i, part in enumerate(parts):
                st = _lstat(fd, part)
                if st is None or _is_whiteout(st):  # a whiteout in this layer yields to its content
                    if st is not None:
                        os.unlink(part, dir_fd=fd)
                    os.mkdir(part, 0o700, dir_fd=fd)
                    os.chmod(part, 0o755, dir_fd=fd, follow_symlinks=True)  # just made: not a symlink
                elif not stat.S_ISDIR(st.st_mode):
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise ImageError(f"{self.where}: member {name!r} goes through {'/'.join(parts[: i + 1])!r}, which is {kind}")
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)  # O_NOFOLLOW: no swap since the lstat
                os.close(fd)
                fd = sub
            return fd
        except BaseException:
            os.close(fd)
            raise

    def whiteout(self, fd: int, parts: tuple[str, ...], name: str) -> None:
        base = parts[-1]
        if base == ".wh..wh..opq":
            try:
                os.setxattr(fd, self.opaque, b"y")
            except OSError as exc:
                raise ImageError(f"{self.where}: cannot mark {name!r} opaque: setting {self.opaque}: {exc.strerror}") from None
            return
        hidden = base[len(".wh.") :]
        if base.startswith(".wh..wh.") or hidden in ("", ".", "..") or _lstat(fd, hidden) is not None:
            return  # aufs metadata, nonsense, or content of this very layer (which wins)
        try:
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=fd)
        except PermissionError as exc:
            raise ImageError(f"{self.where}: cannot create the whiteout for {name!r} (rootless needs Linux 5.8): {exc.strerror}") from None

    def create(self, fd: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        name = parts[-1]
        st = _lstat(fd, name)
        if member.isdir():
            if st is None or not stat.S_ISDIR(st.st_mode):
                _remove(fd, name)
                os.mkdir(name, 0o700, dir_fd=fd)  # u+rwx until the final pass
            self.dirs[parts] = member
            return
        if st is not None:  # a later member replaces an earlier one
            if stat.S_ISDIR(st.st_mode):
                self.dirs = {p: m for p, m in self.dirs.items() if p[: len(parts)] != parts}
            _remove(fd, name)
        if member.isreg():
            self.file(fd, name, member)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=fd)
            self.path_attrs(fd, name, member, symlink=True)
        elif member.islnk():
            self.hardlink(fd, name, member)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=fd)
            self.path_attrs(fd, name, member)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=fd)
            except (PermissionError, OverflowError, ValueError):
                self.skipped_devices += 1
                return
            self.path_attrs(fd, name, member)

    def file(self, fd: int, name: str, member: tarfile.TarInfo) -> None:
        data = self.tar.extractfile(member)
        out_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
        with open(out_fd, "wb") as out:
            if data is not None:
                shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            self.attrs(out.fileno(), member)

    def hardlink(self, fd: int, name: str, member: tarfile.TarInfo) -> None:
        target = _split(member.linkname, self.where, "hard link target")
        if not target:
            raise ImageError(f"{self.where}: hard link {member.name!r} to the layer root")
        target_fd = self.walk(target[:-1], member.name)
        try:
            os.link(target[-1], name, src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            raise ImageError(f"{self.where}: hard link {member.name!r} to {member.linkname!r}: {exc.strerror}") from None
        finally:
            os.close(target_fd)

    def mode(self, member: tarfile.TarInfo) -> int:
        # rootless: no set-id files in the user's cache (they would only ever be the user's own)
        return member.mode & (0o7777 if self.as_root or member.isdir() else 0o1777)

    def attrs(self, fd: int, member: tarfile.TarInfo) -> None:
        if self.as_root:
            os.fchown(fd, member.uid, member.gid)  # before chmod: chown clears set-id bits
        os.fchmod(fd, self.mode(member))
        self.xattrs(fd, member)
        os.utime(fd, (member.mtime, member.mtime))

    def path_attrs(self, fd: int, name: str, member: tarfile.TarInfo, symlink: bool = False) -> None:
        if self.as_root:
            os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        if not symlink:  # just created by us: a fifo or device, chmod cannot be redirected
            os.chmod(name, self.mode(member), dir_fd=fd)
        os.utime(name, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)

    def xattrs(self, fd: int, member: tarfile.TarInfo) -> None:
        """Best effort for PAX ``SCHILY.xattr.*`` (e.g. file capabilities), never overlay's own."""
        for key, value in member.pax_headers.items():
            attr = key[len("SCHILY.xattr.") :]
            if not key.startswith("SCHILY.xattr.") or ".overlay." in attr:
                continue
            with contextlib.suppress(OSError):
                os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
