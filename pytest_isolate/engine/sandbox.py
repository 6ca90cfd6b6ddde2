"""``pytest_isolate.Sandbox``: run programs and Python callables in sandboxes, without pytest.

Each ``run``/``popen`` gets a sandbox of its own (namespaces, copy-on-write root, cgroup leaf), built
by the same factory as the marker's; the program is started by the sandbox's init (see ``execd``).
``call`` forks this process into a sandbox, as the marker does for a test. Closing the Sandbox kills
whatever still runs and removes every cgroup, mount and network it made.
"""

from __future__ import annotations

import base64
import os
import pickle
import shutil
import signal
import stat
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence, TypeVar, Union

from ..linux.cgroups import INSIDE_ENV, CgroupError, Limits, detect
from ..linux.mounts import Step
from ..linux.rootfs import RootOptions
from ..linux.tree import remove_tree
from .accounting import Measurement
from .channel import Channel
from .errors import IsolationDegradedWarning, IsolationUnavailable, SandboxCallError, SandboxRunError, signal_name
from .explain import explain
from .factory import SetupFailure
from .host import current_host, disk_upper_dirs
from .launch import Launcher, Plan
from .process import DEVNULL, PIPE, ExecFailed, SandboxProcess, Stream
from .spec import FIELD_NAMES, SandboxSpec, SpecError, build_spec

T = TypeVar("T")
POLICIES = ("fail", "skip", "degrade")
IMAGE_STEPS = (Step("image", "/"), Step("proc", "/proc"), Step("rbind", "/dev"), Step("rbind", "/sys"))
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUN_OPTIONS = FIELD_NAMES + ("env", "cwd", "rootfs", "network")


@dataclass(frozen=True)
class SandboxResult:
    """How a ``Sandbox.run`` ended; ``returncode`` is negative for a signal, as in ``subprocess``."""

    args: list[str]
    returncode: int
    stdout: Any
    stderr: Any
    timed_out: bool
    oom_killed: bool
    usage: Measurement
    spec: SandboxSpec = field(repr=False)

    @property
    def exit_code(self) -> Optional[int]:
        return self.returncode if self.returncode >= 0 else None

    @property
    def signal(self) -> Optional[int]:
        return -self.returncode if self.returncode < 0 else None

    def check_returncode(self) -> None:
        if self.returncode or self.timed_out or self.oom_killed:
            raise SandboxRunError(self)


def _image_lookup(layers: Sequence[str], path: str) -> Optional[str]:
    """The host path of ``path`` in the stacked ``layers`` (topmost first), following symlinks
    inside the image; None if absent (or whited out)."""
    parts, hops = [p for p in path.split("/") if p], 0
    resolved: list[str] = []
    hit: Optional[str] = "/"
    while parts:
        name = parts.pop(0)
        if name == "..":
            resolved = resolved[:-1]
            continue
        if name == ".":
            continue
        candidate, hit = "/" + "/".join(resolved + [name]), None
        for layer in layers:
            try:
                st = os.lstat(layer + candidate)
            except OSError:
                continue
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):  # a whiteout hides lower layers
                hit = layer + candidate
            break
        if hit is None:
            return None
        if os.path.islink(hit):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(hit)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                resolved = []
            continue
        resolved.append(name)
    return hit


class Sandbox:
    """Start sandboxed programs and calls; keyword defaults apply to every run (see ``run``)."""

    def __init__(self, *, unavailable: str = "fail", skip: Optional[Callable[[str], NoReturn]] = None,
                 image_cache: Optional[str] = None, **defaults: Any) -> None:
        if unavailable not in POLICIES:
            raise SpecError(f"unavailable={unavailable!r} in Sandbox(): expected one of {', '.join(POLICIES)}")
        self._defaults = self._split(defaults, "in Sandbox()")
        self.policy = unavailable
        self._skip = skip
        self._image_cache = image_cache
        self._launcher: Optional[Launcher] = None
        self._live: list[SandboxProcess] = []
        self._networks: list[Any] = []
        self._upper_dirs: list[str] = []
        self.closed = False

    # ------------------------------------------------------------------------------ options --

    @staticmethod
    def _split(values: Mapping[str, Any], where: str) -> dict[str, Any]:
        unknown = sorted(set(values) - set(RUN_OPTIONS))
        if unknown:
            raise SpecError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} {where} "
                            f"(known: {', '.join(RUN_OPTIONS)})")
        return dict(values)

    def _options(self, overrides: Mapping[str, Any], where: str) -> tuple[SandboxSpec, dict[str, Any]]:
        merged = {**self._defaults, **self._split(overrides, where)}
        spec_values = {k: v for k, v in merged.items() if k in FIELD_NAMES}
        extra = {k: v for k, v in merged.items() if k not in FIELD_NAMES}
        spec = build_spec(spec_values, where, allowed=FIELD_NAMES, defaults=SandboxSpec(hostname="sandbox"))
        return spec, extra

    @property
    def launcher(self) -> Launcher:
        if self.closed:
            raise RuntimeError("this Sandbox is closed")
        if self._launcher is None:
            self._launcher = Launcher(detect())
        return self._launcher

    def _unavailable(self, message: str) -> None:
        """Apply the policy to an isolation feature this host cannot give (raise, skip or warn)."""
        if self.policy == "skip" and self._skip is not None:
            self._skip(message)
        if self.policy == "degrade":
            warnings.warn(IsolationDegradedWarning(message), stacklevel=4)
            return
        raise IsolationUnavailable(message)

    def _limited(self, spec: SandboxSpec) -> bool:
        """Whether to use a cgroup leaf; asks the policy when limits are wanted but impossible."""
        session, problem = self.launcher.cgroups()
        if session is not None:
            return True
        wanted = Limits(spec.memory, spec.cpus, spec.pids)
        if wanted != Limits(None, None, None):
            self._unavailable(f"cgroup limits (memory/cpus/pids) cannot be enforced here: {problem}")
        return False

    def _plan(self, spec: SandboxSpec, extra: Mapping[str, Any], *, control: bool, where: str) -> Plan:
        host = current_host()
        rootfs = extra.get("rootfs")
        cwd = extra.get("cwd")
        network = extra.get("network")
        bases: tuple[str, ...] = ()
        if host.needs_disk_upper(spec):  # one pair per Sandbox: each build makes its own directories there
            if not self._upper_dirs:
                self._upper_dirs.extend(disk_upper_dirs())
            bases = tuple(self._upper_dirs)
        plan = host.plan(spec, cwd=os.path.abspath(cwd) if cwd is not None and rootfs is None else os.getcwd(),
                         upper_bases=bases)
        root = plan.root
        if rootfs is not None:
            from ..linux.images import ImageError, default_cache_dir, resolve_rootfs

            try:
                layers = resolve_rootfs(rootfs, self._image_cache or default_cache_dir(), userxattr=plan.userns)
            except ImageError as exc:
                raise SpecError(f"rootfs={os.fspath(rootfs)!r} {where}: {exc}") from exc
            root = RootOptions(steps=IMAGE_STEPS, writable=root.writable, userxattr=root.userxattr,
                               upper_bases=root.upper_bases, layers=layers)
        binds: tuple[tuple[str, str], ...] = ()
        switch = 0
        if network is not None:
            binds, switch = network._attachment()
        if binds:
            root = RootOptions(**{**root.__dict__, "binds": binds})
        return Plan(spec=spec, root=root, userns=plan.userns, uid=plan.uid, gid=plan.gid,
                    cwd=(cwd or "/") if rootfs is not None else plan.cwd, control=control, network=switch)

    def _check_executable(self, argv: Sequence[str], env: Mapping[str, str], plan: Plan, where: str) -> None:
        name = argv[0]
        if plan.root.layers:
            candidates = [name if name.startswith("/") else os.path.join(plan.cwd, name)] if "/" in name else \
                [os.path.join(d or ".", name) for d in env.get("PATH", IMAGE_PATH).split(":")]
            found = next((c for c in candidates if _image_lookup(plan.root.layers, c) is not None), None)
            if found is None:
                raise ExecFailed(2, f"{where}: executable {name!r} not found in the rootfs image "
                                    f"(searched {', '.join(candidates)})")
            return
        if "/" in name:
            path = os.path.join(plan.cwd, name)
            ok = os.path.isfile(path) and os.access(path, os.X_OK)
        else:
            ok = shutil.which(name, path=env.get("PATH", os.defpath)) is not None
        if not ok:
            raise ExecFailed(2, f"{where}: executable {name!r} not found"
                                f"{'' if '/' in name else ' on PATH=' + env.get('PATH', os.defpath)}")

    # -------------------------------------------------------------------------------- start --

    def popen(self, args: Union[str, Sequence[str]], *, stdin: Stream = None, stdout: Stream = None,
              stderr: Stream = None, **options: Any) -> SandboxProcess:
        """Start ``args`` in a new sandbox and return at once (a ``subprocess.Popen``-like handle)."""
        argv = [args] if isinstance(args, str) else [os.fspath(a) for a in args]
        where = f"in Sandbox.popen({argv[0]!r})" if argv else "in Sandbox.popen()"
        if not argv:
            raise SpecError(f"{where}: empty command")
        network = options.get("network", self._defaults.get("network"))
        if network is not None:
            from .network import Network

            if not isinstance(network, Network):
                raise SpecError(f"network={network!r} {where}: expected a network made by Sandbox.network()")
            if "hostname" not in options and "hostname" not in self._defaults:
                options = {**options, "hostname": network._next_name()}
        spec, extra = self._options(options, where)
        if network is not None and spec.net != "none":
            raise SpecError(f"network= {where}: cannot be combined with net={spec.net!r}")
        plan = self._plan(spec, extra, control=True, where=where)
        env = dict(extra["env"]) if extra.get("env") is not None else (
            {"PATH": IMAGE_PATH, "HOME": "/root" if plan.uid == 0 else "/"} if plan.root.layers else dict(os.environ))
        env[INSIDE_ENV] = "1"
        self._check_executable(argv, env, plan, where)
        self._limited(spec)
        launcher = self.launcher
        try:
            prepared, leaf = launcher.acquire(plan)
        except (SetupFailure, CgroupError) as exc:
            message = explain(exc) if isinstance(exc, SetupFailure) else f"cgroup limits: {exc}"
            self._unavailable(message)
            raise IsolationUnavailable(message) from exc

        def release() -> None:
            launcher.release(prepared, leaf)

        address = None
        if network is not None:
            try:
                address = network._attach(prepared.init, spec.hostname)
            except BaseException:
                release()
                raise
        proc = SandboxProcess(argv, prepared, leaf, release, env=env, cwd=plan.cwd, timeout=spec.timeout,
                              stdin=stdin, stdout=stdout, stderr=stderr, spec=spec)
        proc.hostname, proc.address = spec.hostname, address
        self._live.append(proc)
        if network is None:
            # the next two sandboxes like this one are built while this one runs, side by side, so
            # a loop of calls rarely waits for a build
            launcher.prepare(plan, ahead=2)
        launcher.tidy()  # cgroup leaves of ended sandboxes go while this program runs
        return proc

    def run(self, args: Union[str, Sequence[str]], *, input: Optional[bytes] = None, check: bool = False,
            capture_output: bool = True, text: bool = False, **options: Any) -> SandboxResult:
        """Run ``args`` to its end in a new sandbox (like ``subprocess.run``; output captured)."""
        if text and isinstance(input, str):
            input = input.encode()
        pipe_or_inherit = PIPE if capture_output else None
        proc = self.popen(args, stdin=PIPE if input is not None else DEVNULL, stdout=pipe_or_inherit,
                          stderr=pipe_or_inherit, **options)
        try:
            out, err = proc.communicate(input)
        finally:
            proc.close()
            self._live.remove(proc)
        result = SandboxResult(proc.args, proc.returncode if proc.returncode is not None else -signal.SIGKILL,
                               out.decode(errors="replace") if text and out is not None else out,
                               err.decode(errors="replace") if text and err is not None else err,
                               proc.timed_out, proc.oom_killed, proc.usage(), proc.spec)
        if check:
            result.check_returncode()
        return result

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``func(*args, **kwargs)`` in a forked sandbox and return its (pickled) result;
        an exception is raised again here, its original traceback attached."""
        options = kwargs.pop("sandbox_options", {})
        where = f"in Sandbox.call({getattr(func, '__qualname__', func)!r})"
        spec, extra = self._options(options, where)
        if extra.get("rootfs") is not None or extra.get("network") is not None:
            raise SpecError(f"{where}: rootfs= and network= need a program (run/popen): a call runs this interpreter")
        plan = self._plan(spec, extra, control=False, where=where)

        def target(chan: Channel) -> int:
            try:
                payload: tuple[Any, ...] = ("ok", func(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - every exception goes back to the caller
                payload = ("error", exc, traceback.format_exc())
            try:
                data = pickle.dumps(payload)
            except Exception as exc:  # noqa: BLE001
                text = payload[2] if payload[0] == "error" else f"the result {payload[1]!r} cannot be pickled: {exc}\n"
                data = pickle.dumps(("error", None, text))
            chan.send("call", data=base64.b64encode(data).decode())
            return 0

        limited = self._limited(spec)
        outcome = self.launcher.launch(plan, target, limited=limited)
        self.launcher.prepare(plan)  # a loop of calls finds its next sandbox built
        if outcome.setup_error is not None and not outcome.records:
            self._unavailable(explain(outcome.setup_error))
            raise IsolationUnavailable(explain(outcome.setup_error))
        for record in outcome.records:
            if record["kind"] == "call":
                kind, *rest = pickle.loads(base64.b64decode(record["data"]))
                if kind == "ok":
                    return rest[0]  # type: ignore[no-any-return]
                exc, text = rest
                remote = SandboxCallError(f"in the sandbox:\n{text}")
                if exc is None:
                    raise remote
                raise exc from remote
        raise SandboxCallError(_how_it_died(outcome, func))

    def network(self, subnet: str = "10.88.0.0/24") -> Any:
        """A private network between sandboxes started with ``network=`` it (see ``Network``)."""
        from .network import Network

        if self.closed:
            raise RuntimeError("this Sandbox is closed")
        net = Network(subnet)
        self._networks.append(net)
        return net

    # ------------------------------------------------------------------------------- ending --

    def close(self) -> None:
        """Kill every program still running, end its sandbox, remove cgroups and networks."""
        if self.closed:
            return
        for proc in list(self._live):
            proc.close()
        self._live.clear()
        for net in self._networks:
            net.close()
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        for path in self._upper_dirs:
            if os.path.isdir(path):
                remove_tree(path)
        self.closed = True

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _how_it_died(outcome: Any, func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", repr(func))
    usage = outcome.measurement
    if outcome.timed_out and outcome.spec is not None:
        return f"{name} timed out after {outcome.wall:.1f}s (limit {outcome.spec.timeout:g}s) in the sandbox"
    if usage is not None and usage.oom_kills:
        return f"{name} was OOM-killed in the sandbox (memory limit {outcome.spec.memory} bytes)"
    if outcome.signal is not None:
        return f"{name} crashed with {signal_name(outcome.signal)} in the sandbox"
    return f"{name} ended the sandboxed process with exit status {outcome.exit_code} before returning"
