"""Images as a rootfs: which layers, in which order, unpacked safely and only once.

Every image is built here with tarfile/json/hashlib: OCI layouts, ``docker save`` archives and plain
root filesystem tarballs. The suite passes as root and as an unprivileged user; the overlay mount at
the end runs in an ``unshare`` child, never in this process.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest

from conftest import need
from pytest_isolate.linux import images
from pytest_isolate.linux.images import ImageError, default_cache_dir, resolve_rootfs

ROOT = os.geteuid() == 0
MTIME = 1_600_000_000
Entry = tuple[tarfile.TarInfo, bytes]
TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


# --- building images ---


def member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "",
           uid: int = 0, dev: tuple[int, int] = (0, 0)) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, MTIME
    info.uid = info.gid = uid
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def directory(name: str, mode: int = 0o755) -> Entry:
    return member(name, kind=tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    return member(name, kind=tarfile.SYMTYPE, mode=0o777, link=target)


def hardlink(name: str, target: str) -> Entry:
    return member(name, kind=tarfile.LNKTYPE, link=target)


def tar_bytes(*entries: Entry, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / sha(data)).write_bytes(data)
    return {"digest": f"sha256:{sha(data)}", "size": len(data)}


def oci_layout(layout: Path, layers: Sequence[tuple[bytes, str]], *, nested: bool = False) -> list[str]:
    """An OCI image layout of ``layers`` (bottom first, with their media types); their digests."""
    config = put_blob(layout, json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    descs = [dict(put_blob(layout, data), mediaType=media) for data, media in layers]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"), "layers": descs}
    top = dict(put_blob(layout, json.dumps(manifest).encode()), mediaType=manifest["mediaType"])
    if nested:  # a multi-platform index: a foreign platform first, whose blob is not even here
        machine = os.uname().machine
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        foreign = {"digest": "sha256:" + "0" * 64, "size": 1, "mediaType": manifest["mediaType"],
                   "platform": {"os": "linux", "architecture": "s390x" if arch != "s390x" else "amd64"}}
        index = {"schemaVersion": 2, "manifests": [foreign, dict(top, platform={"os": "linux", "architecture": arch})]}
        top = dict(put_blob(layout, json.dumps(index).encode()), mediaType="application/vnd.oci.image.index.v1+json")
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return [str(d["digest"]).split(":")[1] for d in descs]


def tar_of_tree(tree: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    return dest


def docker_save(dest: Path, layers: Sequence[bytes]) -> Path:
    """The legacy ``docker save`` format: ``<id>/layer.tar`` members listed by manifest.json."""
    entries = []
    for i, data in enumerate(layers):
        entries += [directory(f"l{i}"), member(f"l{i}/layer.tar", data), member(f"l{i}/VERSION", b"1.0")]
    entries.append(member("cfg.json", b"{}"))
    manifest = [{"Config": "cfg.json", "RepoTags": ["t:latest"], "Layers": [f"l{i}/layer.tar" for i in range(len(layers))]}]
    entries.append(member("manifest.json", json.dumps(manifest).encode()))
    dest.write_bytes(tar_bytes(*entries))
    return dest


BASE = tar_bytes(directory("etc"), member("etc/keep", b"keep"), member("etc/gone", b"gone"),
                 directory("opq"), member("opq/a", b"a"), directory("opq/sub"), member("opq/sub/b", b"b"), gz=True)
TOP = tar_bytes(directory("etc"), member("etc/.wh.gone"), directory("opq"), member("opq/.wh..wh..opq"),
                member("opq/c", b"c"))


def opaque_attr(userxattr: bool) -> str:
    return "user.overlay.opaque" if userxattr else "trusted.overlay.opaque"


def flavours() -> list[bool]:
    return [True, False] if ROOT else [True]  # trusted.* xattrs need real root


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def cache_entries(cache: Path) -> list[str]:
    return sorted(os.listdir(cache / "layers")) if (cache / "layers").exists() else []


@pytest.fixture
def whiteouts(tmp_path: Path) -> None:
    """Layers with whiteouts need a 0:0 character device; some hosts refuse even that (Docker's
    default profile: EPERM), and there no sandbox could use an image anyway."""
    probe = tmp_path / "whiteout-probe"
    try:
        os.mknod(probe, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        probe.unlink()
    except PermissionError as exc:
        need(False, f"whiteout creation (mknod of a 0:0 character device: {exc.strerror})")


# --- kinds of source ---


def test_plain_directory_is_used_as_is(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tree)
    assert resolve_rootfs(tmp_path / "link", str(tmp_path / "cache"), userxattr=True) == (str(tree),)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_plain_tarball_is_one_layer_with_everything_in_place(tmp_path: Path, gz: bool) -> None:
    data = tar_bytes(
        directory("./"), directory("etc"), member("etc/hostname", b"box\n"), member("bin/tool", b"#!", mode=0o4755, uid=1234),
        symlink("etc/link", "/etc/hostname"), hardlink("etc/hard", "etc/hostname"),
        member("run/fifo", kind=tarfile.FIFOTYPE, mode=0o640), member("dev/null", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        directory("ro", 0o555), member("ro/inside", b"x", mode=0o444), member("/abs/file", b"abs"), gz=gz)
    archive = tmp_path / "rootfs.img"  # no telling suffix: compression is found by its magic bytes
    archive.write_bytes(data)
    cache = tmp_path / "cache"
    (layer,) = resolve_rootfs(str(archive), str(cache), userxattr=not ROOT)
    assert layer == str(cache / "layers" / (sha(data) + ("" if ROOT else "-u")))
    root = Path(layer)
    assert (root / "etc/hostname").read_bytes() == b"box\n"
    assert os.readlink(root / "etc/link") == "/etc/hostname"
    assert os.stat(root / "etc/hard").st_ino == os.stat(root / "etc/hostname").st_ino
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert stat.S_IMODE(os.lstat(root / "run/fifo").st_mode) == 0o640
    assert (root / "abs/file").read_bytes() == b"abs"  # a leading '/' is dropped
    assert (root / "ro/inside").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(root / "ro").st_mode) == 0o555  # read-only only after its content
    assert stat.S_IMODE(os.stat(root / "bin").st_mode) == 0o755  # implied by a member, whatever the umask
    for path in ("etc/hostname", "ro", "etc"):
        assert os.stat(root / path).st_mtime == MTIME, path
    assert os.lstat(root / "etc/link").st_mtime == MTIME
    tool = os.stat(root / "bin/tool")
    if ROOT:
        assert (stat.S_IMODE(tool.st_mode), tool.st_uid) == (0o4755, 1234)
        assert os.stat(root / "dev/null").st_rdev == os.makedev(1, 3)
    else:  # rootless: files stay the user's, no set-id bit, devices are skipped
        assert (stat.S_IMODE(tool.st_mode), tool.st_uid) == (0o755, os.geteuid())
        assert not (root / "dev/null").exists()


def test_oci_layout_stacks_layers_with_whiteouts_and_opaque_dirs(whiteouts: None, tmp_path: Path) -> None:
    digests = oci_layout(tmp_path / "img", [(BASE, TAR_GZ), (TOP, TAR)])
    for userxattr in flavours():
        cache = tmp_path / "cache"
        layers = resolve_rootfs(tmp_path / "img", str(cache), userxattr=userxattr)
        suffix = "-u" if userxattr else ""
        assert layers == tuple(str(cache / "layers" / (d + suffix)) for d in reversed(digests))  # topmost first
        top, base = map(Path, layers)
        assert (base / "etc/gone").read_bytes() == b"gone"
        assert is_whiteout(top / "etc/gone")
        assert os.getxattr(top / "opq", opaque_attr(userxattr)) == b"y"
        assert not (top / ".wh..wh..opq").exists() and not (top / "opq/.wh..wh..opq").exists()
        assert sorted(os.listdir(top / "opq")) == ["c"]
        assert opaque_attr(not userxattr) not in os.listxattr(top / "opq")


@pytest.mark.skipif(ROOT, reason="root may set trusted.* xattrs")
def test_rootless_cannot_write_trusted_opaque_xattr(whiteouts: None, tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [(BASE, TAR_GZ), (TOP, TAR)])
    with pytest.raises(ImageError, match=r"cannot mark 'opq/.wh..wh..opq' opaque: setting trusted.overlay.opaque"):
        resolve_rootfs(tmp_path / "img", str(tmp_path / "cache"), userxattr=False)
    dirs = [e for e in cache_entries(tmp_path / "cache") if not e.endswith(".lock")]
    assert dirs == [sha(BASE)]  # the bottom layer (no opaque dir) is fine; no partial top layer is left


def test_whiteouts_in_this_layer_yield_to_its_content(whiteouts: None, tmp_path: Path) -> None:
    data = tar_bytes(member(".wh.a"), member("a", b"a"), member("b", b"b"), member(".wh.b"),
                     member(".wh.d"), member("d/e", b"e"), member(".wh..wh.plnk"))
    archive = tmp_path / "one.tar"
    archive.write_bytes(data)
    (layer,) = resolve_rootfs(archive, str(tmp_path / "cache"), userxattr=True)
    assert sorted(os.listdir(layer)) == ["a", "b", "d"]
    assert (Path(layer) / "d/e").read_bytes() == b"e"


def test_nested_index_picks_this_machine_platform(whiteouts: None, tmp_path: Path) -> None:
    digests = oci_layout(tmp_path / "img", [(TOP, TAR)], nested=True)
    layers = resolve_rootfs(tmp_path / "img", str(tmp_path / "cache"), userxattr=True)
    assert [os.path.basename(p) for p in layers] == [digests[0] + "-u"]


def test_index_without_this_platform_is_refused(tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [(TOP, TAR)])
    index = json.loads((tmp_path / "img/index.json").read_text())
    one = index["manifests"][0]
    index["manifests"] = [dict(one, platform={"os": "linux", "architecture": a}) for a in ("mips", "sparc")]
    (tmp_path / "img/index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match=r"index.json lists 2 manifests, none for linux/.*: linux/mips, linux/sparc"):
        resolve_rootfs(tmp_path / "img", str(tmp_path / "cache"), userxattr=True)


def test_docker_save_archive(whiteouts: None, tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "saved.tar", [BASE, TOP])
    layers = resolve_rootfs(archive, str(tmp_path / "cache"), userxattr=True)
    assert [os.path.basename(p) for p in layers] == [sha(TOP) + "-u", sha(BASE) + "-u"]
    assert is_whiteout(Path(layers[0]) / "etc/gone")
    assert (Path(layers[1]) / "opq/sub/b").read_bytes() == b"b"


def test_oci_layout_inside_a_tarball_shares_the_layers_of_the_directory(whiteouts: None, tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [(BASE, TAR_GZ), (TOP, TAR)])
    (tmp_path / "img/manifest.json").write_text('[{"Layers": ["nothing/here.tar"]}]')  # OCI wins over docker's file
    archive = tar_of_tree(tmp_path / "img", tmp_path / "oci.tar")
    archive_gz = tmp_path / "oci.tgz"
    archive_gz.write_bytes(gzip.compress(archive.read_bytes()))
    cache = str(tmp_path / "cache")
    expected = resolve_rootfs(tmp_path / "img", cache, userxattr=True)
    assert resolve_rootfs(archive, cache, userxattr=True) == expected
    assert resolve_rootfs(archive_gz, cache, userxattr=True) == expected


# --- the cache ---


def test_layers_are_unpacked_once_and_archives_hashed_once(whiteouts: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unpacked: list[str] = []
    real_run = images._Unpacker.run

    def counting_run(self: Any) -> None:
        unpacked.append(self.root)
        real_run(self)

    monkeypatch.setattr(images._Unpacker, "run", counting_run)
    oci_layout(tmp_path / "img", [(BASE, TAR_GZ), (TOP, TAR)])
    archive = tmp_path / "root.tar.gz"
    archive.write_bytes(BASE)  # the same bytes as the image's base layer: the same layer directory
    cache = str(tmp_path / "cache")
    first = resolve_rootfs(tmp_path / "img", cache, userxattr=True)
    inodes = [os.stat(p).st_ino for p in first]
    assert resolve_rootfs(archive, cache, userxattr=True) == first[1:]
    assert len(unpacked) == 2

    def no_scan(*args: Any) -> Any:
        raise AssertionError("a known archive is read again")

    with monkeypatch.context() as m:
        m.setattr(images, "_scan", no_scan)
        assert resolve_rootfs(tmp_path / "img", cache, userxattr=True) == first
        assert resolve_rootfs(archive, cache, userxattr=True) == first[1:]
    assert [os.stat(p).st_ino for p in first] == inodes and len(unpacked) == 2
    archive.write_bytes(TOP)  # changed in place: recognised by its ctime, hashed and unpacked anew
    assert resolve_rootfs(archive, cache, userxattr=True) == first[:1]
    assert len(unpacked) == 2  # ... but TOP's layer was already there
    assert not [e for e in cache_entries(tmp_path / "cache") if e.startswith(".")]


CHILD = """
import json, os, sys, time
from pytest_isolate.linux import images
real_run = images._Unpacker.run
def slow_run(self):
    with open(sys.argv[3], "a") as log:
        log.write(os.path.basename(self.root) + "\\n")
    time.sleep(0.5)  # let the other process arrive while this layer is being unpacked
    real_run(self)
images._Unpacker.run = slow_run
while not os.path.exists(sys.argv[4]):
    time.sleep(0.005)
print(json.dumps(images.resolve_rootfs(sys.argv[1], sys.argv[2], userxattr=True)))
"""


def test_concurrent_processes_unpack_each_layer_once(whiteouts: None, tmp_path: Path) -> None:
    many = [member(f"d{i // 50}/f{i}", b"%d" % i) for i in range(500)]
    oci_layout(tmp_path / "img", [(tar_bytes(*many, gz=True), TAR_GZ), (TOP, TAR)])
    log, go = tmp_path / "unpacks.log", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(Path(images.__file__).parents[2]))
    argv = [sys.executable, "-c", CHILD, str(tmp_path / "img"), str(tmp_path / "cache"), str(log), str(go)]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    go.touch()
    results = [c.communicate(timeout=60) for c in children]
    assert [c.returncode for c in children] == [0, 0], results
    outputs = {out for out, _ in results}
    assert len(outputs) == 1
    assert len(json.loads(outputs.pop())) == 2
    assert len(log.read_text().split()) == 2  # one unpack per layer, though both processes needed both
    assert not [e for e in cache_entries(tmp_path / "cache") if e.startswith(".")]


# --- refusals ---


@pytest.mark.parametrize(
    "entries",
    [
        [member("../evil", b"x")],
        [member("a/../../evil", b"x")],
        [symlink("link", "{outside}"), member("link/evil", b"x")],
        [symlink("up", "../.."), member("up/evil", b"x")],
        [symlink("link", "{outside}"), directory("link/sub")],
        [hardlink("evil", "../outside/secret")],
        [symlink("link", "{outside}"), hardlink("evil", "link/secret")],
        [symlink("d", "/"), member("d/.wh.secret")],
    ],
    ids=["dotdot", "dotdot-inside", "abs-symlink", "rel-symlink", "dir-through-symlink", "hardlink-out",
         "hardlink-through-symlink", "whiteout-through-symlink"],
)
def test_members_cannot_write_outside_the_layer(tmp_path: Path, entries: list[Entry]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    for info, _ in entries:
        info.linkname = info.linkname.format(outside=outside)
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_bytes(member("ok", b"ok"), *entries))
    with pytest.raises(ImageError, match=r"rootfs '.*evil.tar': .*(escapes the layer root|goes through '(link|up|d)', which is a symlink)"):
        resolve_rootfs(archive, str(tmp_path / "cache"), userxattr=True)
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "s"
    assert set(os.listdir(tmp_path)) - {"cache"} == {"evil.tar", "outside"}
    assert all(e.endswith(".lock") for e in cache_entries(tmp_path / "cache"))  # no layer, no leftover


def test_layer_digest_mismatch(tmp_path: Path) -> None:
    digests = oci_layout(tmp_path / "img", [(BASE, TAR_GZ), (TOP, TAR)])
    (tmp_path / "img/blobs/sha256" / digests[1]).write_bytes(tar_bytes(member("other", b"x")))
    with pytest.raises(ImageError, match=rf"rootfs '.*img': blobs/sha256/{digests[1]}: digest mismatch"):
        resolve_rootfs(tmp_path / "img", str(tmp_path / "cache"), userxattr=True)
    assert not [e for e in cache_entries(tmp_path / "cache") if e.startswith(digests[1])
                and not e.endswith(".lock")]


def test_manifest_digest_mismatch(tmp_path: Path) -> None:
    oci_layout(tmp_path / "img", [(TOP, TAR)])
    index = json.loads((tmp_path / "img/index.json").read_text())
    manifest = tmp_path / "img/blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest.write_bytes(manifest.read_bytes() + b" ")
    with pytest.raises(ImageError, match=r"digest mismatch"):
        resolve_rootfs(tmp_path / "img", str(tmp_path / "cache"), userxattr=True)


def _broken_index(img: Path) -> None:
    (img / "index.json").write_text("{not json")


def _missing_blob(img: Path) -> None:
    for blob in (img / "blobs/sha256").iterdir():
        if blob.read_bytes() == TOP:
            blob.unlink()


def _zstd(img: Path) -> None:
    for blob in (img / "blobs/sha256").iterdir():
        if b'"layers"' in blob.read_bytes():
            manifest = json.loads(blob.read_bytes())
            manifest["layers"][0]["mediaType"] += "+zstd"
            blob.write_text(json.dumps(manifest))  # its digest no longer matches: use a fresh index
            index = json.loads((img / "index.json").read_text())
            index["manifests"][0]["digest"] = "sha256:" + sha(blob.read_bytes())
            blob.rename(blob.with_name(sha(blob.read_bytes())))
            (img / "index.json").write_text(json.dumps(index))
            return


def _too_many(img: Path) -> None:
    layers = [{"mediaType": TAR, "digest": "sha256:" + "1" * 64, "size": 1}] * 501
    desc = put_blob(img, json.dumps({"schemaVersion": 2, "layers": layers}).encode())
    (img / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_broken_index, "index.json is not valid JSON"),
        (_missing_blob, "blobs/sha256/[0-9a-f]{64} is missing"),
        (_zstd, r"zstd-compressed layers \(.*\+zstd\) are not supported"),
        (_too_many, "501 layers, overlayfs stacks at most 500"),
    ],
    ids=["broken-index", "missing-blob", "zstd", "too-many-layers"],
)
def test_broken_oci_layouts(tmp_path: Path, damage: Any, message: str) -> None:
    img = tmp_path / "img"
    oci_layout(img, [(BASE, TAR_GZ), (TOP, TAR)])
    damage(img)
    with pytest.raises(ImageError, match=rf"^rootfs '{re.escape(str(img))}': {message}"):
        resolve_rootfs(img, str(tmp_path / "cache"), userxattr=True)
    assert not [e for e in cache_entries(tmp_path / "cache") if not e.endswith(".lock")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file or directory"),
        (b"just text\n", images.NOT_AN_IMAGE),
        (b"", images.NOT_AN_IMAGE),
        (tar_bytes(), "empty tar archive"),
        (gzip.compress(b"not a tar" * 100), images.NOT_AN_IMAGE),
    ],
    ids=["missing", "text", "empty-file", "empty-tar", "gzip-not-tar"],
)
def test_unusable_paths_are_named(tmp_path: Path, content: Optional[bytes], message: str) -> None:
    path = tmp_path / "x" / "img.tar"
    if content is not None:
        path.parent.mkdir()
        path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        resolve_rootfs(path, str(tmp_path / "cache"), userxattr=True)
    assert str(info.value) == f"rootfs '{path}': {message}"


def test_a_fifo_is_not_an_image(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ImageError, match=f"rootfs '.*pipe': {images.NOT_AN_IMAGE}"):
        resolve_rootfs(tmp_path / "pipe", str(tmp_path / "cache"), userxattr=True)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PYTEST_ISOLATE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == f"{tmp_path}/.cache/pytest-isolate/images"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert default_cache_dir() == f"{tmp_path}/.cache/pytest-isolate/images"
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == "/xdg/pytest-isolate/images"
    monkeypatch.setenv("PYTEST_ISOLATE_CACHE", "/explicit")
    assert default_cache_dir() == "/explicit"


# --- what overlayfs makes of it ---

MOUNT = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
lower, base, options = sys.argv[1], sys.argv[2], sys.argv[3]
for d in ("upper", "work", "merged"):
    os.mkdir(os.path.join(base, d))
data = f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work{options}".encode()
if libc.mount(b"overlay", f"{base}/merged".encode(), b"overlay", 0, data) != 0:
    sys.exit("mount: " + os.strerror(ctypes.get_errno()))
merged = os.path.join(base, "merged")
print(sorted(os.listdir(merged + "/etc")), sorted(os.listdir(merged + "/opq")))
"""


@pytest.mark.parametrize("userns", [True, False], ids=["userns-userxattr", "root-trusted"])
def test_overlayfs_honours_whiteouts_and_opaque_dirs(tmp_path: Path, userns: bool) -> None:
    if not userns and not ROOT:
        pytest.skip("a mount with trusted.* xattrs needs real root")
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True, check=False)
    need(probe.returncode == 0, f"unprivileged user and mount namespaces (unshare -Urm: {probe.stderr.strip()})")
    oci_layout(tmp_path / "img", [(BASE, TAR_GZ), (TOP, TAR)])
    layers = resolve_rootfs(tmp_path / "img", str(tmp_path / "cache"), userxattr=userns)
    unshare = ["unshare", "-Urm"] if userns else ["unshare", "-m"]
    out = subprocess.run([*unshare, sys.executable, "-c", textwrap.dedent(MOUNT), ":".join(layers), str(tmp_path),
                          ",userxattr" if userns else ""], capture_output=True, text=True, check=False)
    kernel_made = tmp_path / "work" / "work"  # mode 000: pytest's clean-up of old base temps can't list it
    if kernel_made.is_dir():
        kernel_made.chmod(0o700)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['keep'] ['c']"
