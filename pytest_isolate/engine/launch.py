"""Start a payload in a prepared sandbox, supervise it, and collect how it ended.

The factory (``factory.py``) has already built the sandbox: namespaces, root, init as PID 1. Here
the supervisor forks once and the child joins the sandbox with ``setns``:

* root: the supervisor points its own ``pid_for_children`` at the sandbox's PID namespace around
  the fork, so the forked child *is* PID 2; the child joins the other namespaces itself;
* rootless: ``setns`` into a PID namespace needs CAP_SYS_ADMIN where we have none, so a relay child
  joins the user namespace (where it has every capability) and points its children at the PID
  namespace, then forks PID 2 (which joins the other namespaces itself, as root) and reports its
  exit status. Where it can (``linux/relay.py``) the relay makes PID 2 with ``clone(CLONE_VM)``,
  sharing the relay's memory instead of copying it: the relay is the only copy of the pytest
  process made, and we go on once it is forked, as root.

When the payload exits, or the deadline passes, or pytest is interrupted, the supervisor kills the
init: the kernel then kills everything left in the PID namespace.
"""

from __future__ import annotations

import gc
import os
import resource
import select
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, NoReturn, Optional

from ..linux import libc
from ..linux import relay as native_relay
from ..linux.cgroups import INSIDE_ENV, CgroupError, Driver, Leaf, Limits, Session
from ..linux.nsjoin import Namespaces
from ..linux.rootfs import RootOptions
from .accounting import Measurement, from_cgroup, from_rusage
from .channel import Channel
from .factory import Blueprint, Factory, Prepared, SetupFailure, join_cgroup
from .spec import SandboxSpec

__all__ = ["Launcher", "Outcome", "Plan", "Running", "SetupFailure"]

@dataclass(frozen=True)
class Plan:
    """Everything one sandbox needs, decided in the supervisor."""

    spec: SandboxSpec
    root: RootOptions
    userns: bool
    uid: int
    gid: int
    cwd: str
    control: bool = False  # the init starts the program (Sandbox.run/popen), not a fork of ours
    network: int = 0  # host PID of the switch of the network this sandbox joins

    @cached_property
    def blueprint(self) -> Blueprint:
        return Blueprint(self.userns, self.uid, self.gid, self.spec.hostname, self.spec.net, self.root,
                         self.control, self.network)

    @cached_property
    def key(self) -> str:
        """The blueprint as JSON: what the factory gets, and what makes two sandboxes interchangeable."""
        return self.blueprint.to_json()


@dataclass
class Outcome:
    """How a sandbox ended: the payload's wait status (if it got that far) and the supervisor's view."""

    status: Optional[int] = None
    setup_error: Optional[SetupFailure] = None
    timed_out: bool = False
    interrupted: bool = False
    wall: float = 0.0
    rusage: Optional[resource.struct_rusage] = None
    records: list[dict[str, Any]] = field(default_factory=list)
    measurement: Optional[Measurement] = None  # its source says whether a cgroup counted it
    spec: Optional[SandboxSpec] = None

    @property
    def exit_code(self) -> Optional[int]:
        return os.WEXITSTATUS(self.status) if self.status is not None and os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> Optional[int]:
        return os.WTERMSIG(self.status) if self.status is not None and os.WIFSIGNALED(self.status) else None


def _sandbox_flags(plan: Plan) -> int:
    """The namespaces a payload joins besides the PID (and, rootless, the user) namespace."""
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWCGROUP
    if plan.spec.net == "none":  # else the sandbox has no network namespace of its own
        flags |= libc.CLONE_NEWNET
    return flags


def _relay_flags(plan: Plan) -> int:
    """What a relay joins (either kind): the user namespace (PID 2 inherits its capabilities there)
    and the PID namespace for its child, nothing more. PID 2 joins the others itself (see _relay):
    the pytest process waits while a native relay works, not while PID 2 does."""
    return libc.CLONE_NEWUSER | libc.CLONE_NEWPID


def _enter(ns: Namespaces, flags: int, plan: Plan) -> None:
    """Join the namespaces in ``flags``, then the sandbox's cwd."""
    ns.join(flags)
    try:
        os.chdir(plan.cwd)
    except OSError:
        os.chdir("/")


def _fail_early(chan: Channel, step: str, exc: BaseException) -> NoReturn:
    chan.send("setup-error", step=step, errno=getattr(exc, "errno", None), message=str(exc))
    os._exit(125)


def _payload(plan: Plan, chan: Channel, target: Callable[[Channel], int], ns: Namespaces, flags: int,
             procs: tuple[str, ...], gate: int = -1) -> NoReturn:
    """PID 2: die with the supervisor, join its cgroup leaf (from the host's cgroup namespace) and
    the namespaces left to join (root: all; rootless: the cgroup one), run ``target``, exit.

    With a ``gate`` the supervisor moves us into the leaf: we wait for its "g" before running."""
    code = 1
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.environ[INSIDE_ENV] = "1"
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only; it decides
    except BaseException as exc:
        _fail_early(chan, "setns", exc)
    try:
        join_cgroup(procs)
    except OSError as exc:
        _fail_early(chan, "cgroup limits", exc)
    try:
        _enter(ns, flags, plan)
        ns.close()
    except BaseException as exc:
        _fail_early(chan, "setns", exc)
    if gate >= 0 and os.read(gate, 1) != b"g":
        os._exit(125)  # the supervisor could not move us into the leaf; it reported why
    try:
        code = target(chan)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    _finish(chan, code)
    os._exit(code)


def _finish(chan: Channel, code: int) -> None:
    """Tell the supervisor we are done, with our exit code and resource usage, before exiting:
    tearing down a forked copy of pytest takes the kernel milliseconds nobody needs to wait for, and
    the supervisor kills the init at once, so the rest of the sandbox goes while we exit."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    merged = [max(a, b) if name == "ru_maxrss" else a + b
              for name, a, b in zip(RUSAGE_FIELDS, own, children)]
    try:
        chan.finished(code=code, rusage=merged)
    except OSError:
        pass  # the supervisor then waits for our exit instead


def _relay(plan: Plan, chan: Channel, target: Callable[[Channel], int], ns: Namespaces, procs: tuple[str, ...]) -> NoReturn:
    """Rootless: join the user namespace (gaining its capabilities) and the PID namespace for our
    child, fork PID 2; PID 2 joins the rest of the sandbox's namespaces itself.

    The relay stays out of the test's cgroup leaf — with memory.oom.group an OOM kill takes every
    process in the leaf, and the relay must live to report PID 2's exit status — so PID 2 joins the
    leaf itself, and only then the cgroup namespace (after which the leaf would be out of its view).
    """
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _enter(ns, _relay_flags(plan), plan)
        pid = os.fork()
    except BaseException as exc:
        _fail_early(chan, "setns", exc)
    if pid == 0:
        _payload(plan, chan, target, ns, _sandbox_flags(plan), procs)
    try:
        libc.set_name(b"isolate-relay")  # in ps, and for benchmarks/cpu_by_process.py
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    chan.send("exit", status=status)
    os._exit(0)


RUSAGE_FIELDS = ("ru_utime", "ru_stime", "ru_maxrss", "ru_ixrss", "ru_idrss", "ru_isrss", "ru_minflt", "ru_majflt",
                 "ru_nswap", "ru_inblock", "ru_oublock", "ru_msgsnd", "ru_msgrcv", "ru_nsignals", "ru_nvcsw", "ru_nivcsw")


def _wait(pid: int, done: int, deadline: Optional[float]) -> str:
    """Block until the payload says it is done ("done"), ``pid`` exits ("exit"), or ``deadline``
    (monotonic) passes ("timeout")."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3
    except OSError:
        if deadline is None:
            return "exit"  # an older kernel: wait for the exit itself, as before "done" existed
        raise
    try:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = select.select([done, fd], [], [], left)[0]
        return "done" if done in ready else "exit" if ready else "timeout"
    finally:
        os.close(fd)


def _join_ways(leaf: Optional[Leaf]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How a process gets into ``leaf``: (the ``cgroup.procs`` files another process moves it
    through, the files it writes ``0`` into itself). At most one is non-empty: a leaf the process
    can join cheaply by itself (cgroup v1, ``Leaf.self_join_files``) is never moved into."""
    if leaf is None:
        return (), ()
    own = leaf.self_join_files()
    return ((), own) if own is not None else (leaf.procs_files(), ())


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Running:
    """A payload :meth:`Launcher.begin` started: what :meth:`Launcher.finish` waits for and ends."""

    def __init__(self, plan: Plan, outcome: Outcome) -> None:
        self.plan = plan
        self.outcome = outcome
        self.leaf: Optional[Leaf] = None
        self.sandbox: Optional[Prepared] = None
        self.pid = 0
        self.status_fd = -1  # a native relay's report of the payload's wait status
        self.chan: Optional[Channel] = None  # set while the payload runs; None once it ended (or never ran)
        self.start = 0.0
        self.measured = False


class Launcher:
    """Runs payloads in sandboxes from one factory, ordering the next sandbox ahead of time."""

    def __init__(self, cgroups: Optional[Driver] = None, factory: Optional[Factory] = None) -> None:
        self.factory = factory  # one started early may be handed in (see hooks.Early)
        self.pending: list[tuple[str, int, Optional[Leaf]]] = []  # (blueprint json, ticket, its leaf), oldest first
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.driver = cgroups
        self.session: Optional[Session] = None
        self.cgroup_problem = ""
        self.current: Optional[tuple[Optional[Leaf], float]] = None  # the running sandbox's leaf, start
        # cgroup work kept off the critical path: done while a payload runs and we only wait
        self.spare: Optional[tuple[Limits, Leaf]] = None  # a leaf made ahead for the next test
        self.retired: list[Leaf] = []  # leaves whose usage is read, to remove
        self.exiting: list[int] = []  # payloads that said they were done, to reap
        self.running: list[Running] = []  # begun, not yet finished: cancelled at close

    def _leaf(self, session: Session, limits: Limits) -> Leaf:
        if self.spare is not None:
            made_for, leaf = self.spare
            self.spare = None
            if made_for == limits:
                return leaf
            self.retired.append(leaf)
        return session.new_leaf(limits)

    def _prepare_leaf(self, plan: Plan) -> None:
        session = self.session
        limits = Limits(plan.spec.memory, plan.spec.cpus, plan.spec.pids)
        if session is not None and self.spare is None:
            try:
                self.spare = (limits, session.new_leaf(limits))
            except CgroupError:
                pass  # made again on the critical path, where its error reaches the test

    def tidy(self) -> None:
        """Remove the leaves of sandboxes that have ended (best effort, never waits; close() insists)."""
        self._remove_retired(best_effort=True)

    def _reap(self, block: bool = False) -> None:
        for pid in list(self.exiting):
            try:
                if os.waitpid(pid, 0 if block else os.WNOHANG)[0]:
                    self.exiting.remove(pid)
            except ChildProcessError:
                self.exiting.remove(pid)

    def _remove_retired(self, best_effort: bool = False) -> None:
        """Remove retired leaves. While tests run (``best_effort``) only the empty ones, with one
        rmdir each: a leaf whose processes are still dying (or that fails) stays for the next call.
        At close, every one, killing what is left and waiting for it."""
        self._reap()
        failed = []
        while self.retired:
            leaf = self.retired.pop()
            try:
                if best_effort:
                    if not leaf.try_remove():
                        failed.append(leaf)
                else:
                    leaf.remove()
            except CgroupError:
                if not best_effort:
                    raise
                failed.append(leaf)  # kept: close() tries again and reports
        self.retired.extend(failed)

    def live_usage(self) -> Measurement:
        """In a payload: its sandbox's usage so far (cgroup counters, or rusage estimates)."""
        leaf, start = self.current or (None, time.monotonic())
        wall = time.monotonic() - start
        if leaf is not None:
            return from_cgroup(leaf.usage(), wall)
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        merged = from_rusage(own, wall)
        values = dict(merged.values)
        for name, attr in (("cpu_user", "ru_utime"), ("cpu_system", "ru_stime")):
            values[name] = float(values[name] or 0) + getattr(children, attr)
        return Measurement(values, merged.sources)

    def cgroups(self) -> tuple[Optional[Session], str]:
        """The cgroup session (opened on first use), or None and why not (with the fix)."""
        if self.session is None and not self.cgroup_problem:
            if self.driver is None:
                self.cgroup_problem = "cgroups are not used (disabled)"
            else:
                try:
                    self.session = self.driver.open_session()
                except CgroupError as exc:
                    self.cgroup_problem = str(exc)
        return self.session, self.cgroup_problem

    def start(self) -> None:
        """Start the factory's process ahead of the first sandbox (its interpreter takes tens of ms
        to start: better while the caller does something else)."""
        self._factory()

    def _factory(self) -> Factory:
        if self.factory is not None and self.factory.proc.poll() is not None:
            self.factory.close()  # it died (killed from outside?): start afresh, forget what it was building
            self.retired.extend(leaf for _, _, leaf in self.pending if leaf is not None)
            self.factory, self.pending = None, []
        if self.factory is None:
            self.factory = Factory()
        return self.factory

    def prepare(self, plan: Plan, ahead: int = 1) -> None:
        """Have ``ahead`` sandboxes for ``plan`` built while something else runs (e.g. the current
        test; see factory.serve for how they are built). Sandboxes ordered for another plan are dropped.

        A control plan (Sandbox.run/popen) gets its cgroup leaf now too, and the factory puts the
        sandbox's init into it: the program the init starts is then born in the leaf.
        """
        if any(key != plan.key for key, _, _ in self.pending):
            self.drop_pending()
        while len(self.pending) < ahead:
            self._order(plan)

    def _order(self, plan: Plan) -> None:
        leaf: Optional[Leaf] = None
        if plan.control and self.session is not None:
            leaf = self._leaf(self.session, Limits(plan.spec.memory, plan.spec.cpus, plan.spec.pids))
        else:
            self._prepare_leaf(plan)
        procs, join = _join_ways(leaf)
        try:
            ticket = self._factory().order(plan.key, procs, join)
        except BaseException:
            if leaf is not None:
                self.retired.append(leaf)
            raise
        self.pending.append((plan.key, ticket, leaf))

    def drop_pending(self) -> None:
        while self.pending:
            _, ticket, leaf = self.pending.pop()
            self._factory().discard(ticket)
            if leaf is not None:
                self.retired.append(leaf)

    def _take(self, plan: Plan) -> Prepared:
        return self._take_with_leaf(plan)[0]

    def _take_with_leaf(self, plan: Plan) -> tuple[Prepared, Optional[Leaf]]:
        if not self.pending or self.pending[0][0] != plan.key:
            self.prepare(plan)
        if plan.userns:
            native_relay.native()  # made and self-tested once (~3 ms): best while the factory builds
        _, ticket, leaf = self.pending.pop(0)
        try:
            return self._factory().collect(ticket), leaf
        except BaseException:
            if leaf is not None:
                self.retired.append(leaf)
            raise

    def _fork(self, plan: Plan, chan: Channel, target: Callable[[Channel], int], ns: Namespaces,
              procs: tuple[str, ...], self_join: tuple[str, ...]) -> tuple[int, int]:
        """Fork the payload (rootless: its relay); return the pid to wait for and, for a native
        relay, the pipe it reports the payload's wait status on (else -1). The payload joins its
        leaf itself through ``self_join`` (see _join_ways), else rootless through ``procs`` and as
        root we move it through them. Raises SetupFailure if a native relay could not start it."""
        # The children never return from _relay/_payload (os._exit), so nothing after fork() — in
        # particular the finally below — ever runs in a child.
        if plan.userns:
            relay = native_relay.native()
            if relay is not None:
                return self._fork_native(relay, plan, chan, target, ns, self_join or procs)
            pid = os.fork()
            if pid == 0:
                try:
                    _relay(plan, chan, target, ns, self_join or procs)
                finally:
                    os._exit(125)  # never let an exception climb into the forked copy of the caller
            return pid, -1
        # Root: where the child cannot join cheaply itself, we move it into its leaf while it joins
        # the namespaces (the migrations overlap its setns calls); it waits at the gate before
        # running anything.
        gate, opener = os.pipe() if procs else (-1, -1)
        ns.join(libc.CLONE_NEWPID)  # our children are born in the sandbox: PID 2
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    if opener >= 0:
                        os.close(opener)
                    _payload(plan, chan, target, ns, _sandbox_flags(plan), self_join, gate)
                finally:
                    os._exit(125)
        finally:
            libc.setns(self.own_pid_ns, libc.CLONE_NEWPID)
            if gate >= 0:
                os.close(gate)
        if procs:
            try:
                for path in procs:
                    with open(path, "w") as f:
                        f.write(str(pid))
                os.write(opener, b"g")
            except OSError as exc:
                chan.send("setup-error", step="cgroup limits", errno=exc.errno,
                          message=f"cannot move the test's process into {path}: {exc.strerror}")
            finally:
                os.close(opener)  # without the "g", the child stops at the gate (EOF)
        return pid, -1

    def _fork_native(self, relay: native_relay.Native, plan: Plan, chan: Channel, target: Callable[[Channel], int],
                     ns: Namespaces, procs: tuple[str, ...]) -> tuple[int, int]:
        """Rootless with the native relay: what _relay does, with one copy of us (the relay's,
        which the test process shares) instead of two."""
        try:
            pid, status_fd = relay.fork(ns.pairs(_relay_flags(plan)), charged=bool(procs))  # procs: it has a leaf
        except native_relay.RelayError as exc:
            raise SetupFailure(exc.stage, exc.errno, str(exc)) from None
        if pid == 0:
            try:
                _payload(plan, chan, target, ns, _sandbox_flags(plan), procs)
            finally:
                os._exit(125)
        return pid, status_fd

    def acquire(self, plan: Plan) -> tuple[Prepared, Optional[Leaf]]:
        """A built sandbox for a control ``plan``, its init already in the leaf holding its limits
        (when there is a cgroup session); raises SetupFailure or CgroupError. Give both back with
        :meth:`release`."""
        assert plan.control
        self.cgroups()
        return self._take_with_leaf(plan)

    def release(self, sandbox: Prepared, leaf: Optional[Leaf]) -> None:
        """End the sandbox (killing its init kills everything in it); its leaf is removed later."""
        _kill(sandbox.init)
        if sandbox.control is not None:
            sandbox.control.close()
        self._factory().discard(sandbox.ident)
        if leaf is not None:
            self.retired.append(leaf)

    def launch(self, plan: Plan, target: Callable[[Channel], int], after_start: Optional[Callable[[], None]] = None,
               limited: bool = True, timeout: Optional[float] = None, on_done: Optional[Callable[[bool], None]] = None) -> Outcome:
        """Run ``target`` as PID 2 of a sandbox for ``plan``; wait (with ``timeout``, default the spec's).

        With ``limited`` (and a cgroup session) the payload runs in a fresh leaf holding the spec's
        limits, and the outcome's measurement comes from it; otherwise from rusage (estimates).
        ``on_done``: see :meth:`finish`.
        """
        return self.finish(self.begin(plan, target, after_start, limited, timeout), on_done)

    def begin(self, plan: Plan, target: Callable[[Channel], int], after_start: Optional[Callable[[], None]] = None,
              limited: bool = True, timeout: Optional[float] = None) -> Running:
        """The first half of :meth:`launch`: the payload forked and running (or the setup error in
        the outcome). Follow it with :meth:`finish`, or :meth:`cancel` to kill it unwaited for."""
        run = Running(plan, Outcome(spec=plan.spec if timeout is None else plan.spec.merged(timeout=timeout)))
        session, _ = self.cgroups() if limited else (None, "")
        try:
            if session is not None:
                run.leaf = self._leaf(session, Limits(plan.spec.memory, plan.spec.cpus, plan.spec.pids))
            run.sandbox = self._take(plan)
        except (SetupFailure, CgroupError) as exc:
            run.outcome.setup_error = exc if isinstance(exc, SetupFailure) else SetupFailure("cgroup limits", None, str(exc))
            if run.leaf is not None:
                self.retired.append(run.leaf)
            run.measured = True
            return run
        self.running.append(run)
        try:
            self._start(run, target, after_start)
        except BaseException:
            self._done(run)
            raise
        if run.chan is None:  # nothing runs: its sandbox is released; read its leaf's usage
            self._done(run)
        return run

    def finish(self, run: Running, on_done: Optional[Callable[[bool], None]] = None) -> Outcome:
        """Wait for a payload :meth:`begin` started, end its sandbox and collect its outcome.

        ``on_done(failed)`` is called as soon as the payload says it is done (not if it crashes or
        times out), before anything else: its records are read and its cgroup leaf after it."""
        try:
            if run.chan is not None:
                self._supervise(run, on_done)
        finally:
            self._done(run)
        return run.outcome

    def cancel(self, run: Running) -> None:
        """Kill a payload :meth:`begin` started and its whole sandbox, without a report: its test
        is not to run after all (the session stops). Waits for it, so nothing it did goes on."""
        try:
            if run.chan is not None:
                run.outcome.interrupted = True
                self._stop(run)
        finally:
            self._done(run)

    def _done(self, run: Running) -> None:
        """The run's measurement from its leaf (then retired, removed while the next payload runs or
        at close) or from rusage."""
        if run in self.running:
            self.running.remove(run)
        if run.measured:
            return
        run.measured = True
        outcome = run.outcome
        if run.leaf is not None:
            outcome.measurement = from_cgroup(run.leaf.usage(), outcome.wall)
            self.retired.append(run.leaf)
        else:
            outcome.measurement = from_rusage(outcome.rusage, outcome.wall)

    def _start(self, run: Running, target: Callable[[Channel], int], after_start: Optional[Callable[[], None]]) -> None:
        plan, sandbox, outcome = run.plan, run.sandbox, run.outcome
        assert sandbox is not None
        chan = Channel()
        ns = Namespaces(sandbox.init, libc.CLONE_NEWUSER | libc.CLONE_NEWPID | _sandbox_flags(plan))
        run.start = time.monotonic()  # the test's clock (timeout, wall) starts now, not while its sandbox was built
        self.current = (run.leaf, run.start)  # what the payload's live_usage() reads (fork copies it)
        # The payload's garbage collections then skip the heap it inherits, instead of touching (and
        # so copying) every page of it. Left alone when the program froze objects itself.
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            run.pid, run.status_fd = self._fork(plan, chan, target, ns, *_join_ways(run.leaf))
        except SetupFailure as exc:
            outcome.setup_error = exc
        finally:
            if freeze:
                gc.unfreeze()
            ns.close()
            if run.pid == 0:  # not started (a setup failure, or an error on its way up)
                self.release(sandbox, None)
                self.current = None
                chan.close()
        if run.pid == 0:
            return
        run.chan = chan
        try:
            # While the payload starts we only wait: the deferred cgroup work (earlier tests' leaves
            # removed, the next one made) and the next test's order to the factory.
            self._remove_retired(best_effort=True)
            if after_start is not None:
                after_start()
        except BaseException:
            outcome.interrupted = True
            self._stop(run)
            raise

    def _stop(self, run: Running) -> None:
        """Kill the payload and its sandbox, wait for the payload, end the run."""
        assert run.sandbox is not None
        try:
            _kill(run.sandbox.init)
            _kill(run.pid)
            os.waitpid(run.pid, 0)
        finally:
            self._end(run)

    def _end(self, run: Running) -> None:
        """After the payload's end: release the sandbox (the leaf is retired by _done, after its usage
        is read) and read what the payload sent. Once: afterwards ``chan`` is None."""
        chan = run.chan
        if chan is None:
            return
        run.chan = None
        assert run.sandbox is not None
        if run.status_fd >= 0:
            os.close(run.status_fd)  # a relay still to write gets EPIPE (it blocks every signal)
            run.status_fd = -1
        self.release(run.sandbox, None)
        if self.current == (run.leaf, run.start):
            self.current = None  # (a payload begun in on_done has its own by now)
        run.outcome.wall = time.monotonic() - run.start
        try:
            run.outcome.records = list(chan.records())
        finally:
            chan.close()

    def _supervise(self, run: Running, on_done: Optional[Callable[[bool], None]]) -> None:
        plan, sandbox, leaf, outcome, pid, chan = run.plan, run.sandbox, run.leaf, run.outcome, run.pid, run.chan
        assert sandbox is not None and chan is not None
        ended = ""
        try:
            timeout = outcome.spec.timeout if outcome.spec is not None else None
            ended = _wait(pid, chan.done_fd, None if timeout is None else run.start + timeout)
            if ended != "exit":
                # done: the sandbox's other processes go now, while the payload exits; timeout: all
                _kill(sandbox.init)
            if ended == "timeout":
                outcome.timed_out = True
                if leaf is not None:
                    leaf.kill()
            if ended == "done":
                self.exiting.append(pid)  # reaped later: its exit takes the kernel ~2 ms
            else:
                _, status, outcome.rusage = os.wait4(pid, 0)
                if not plan.userns:
                    outcome.status = status
                elif run.status_fd >= 0:
                    try:
                        outcome.status = native_relay.read_status(run.status_fd)
                    except native_relay.RelayError as exc:  # it could not join or clone: no payload ran
                        outcome.setup_error = SetupFailure(exc.stage, exc.errno, str(exc))
        except BaseException:
            outcome.interrupted = True
            self._stop(run)
            raise
        try:
            if ended == "done" and on_done is not None:
                on_done(chan.failed_before_done())
        finally:
            self._end(run)
        for record in outcome.records:
            if record["kind"] == "exit" and outcome.status is None:
                outcome.status = record["status"]
            elif record["kind"] == "done":
                outcome.status = (record["code"] & 0xFF) << 8  # a wait status: exited with that code
                outcome.rusage = resource.struct_rusage(record["rusage"])
            elif record["kind"] == "setup-error" and outcome.setup_error is None:
                outcome.setup_error = SetupFailure(record["step"], record.get("errno"), record["message"])
        if outcome.setup_error is not None and not any(r["kind"] == "report" for r in outcome.records):
            outcome.status = None

    def close(self) -> None:
        for run in list(self.running):
            self.cancel(run)
        self._reap(block=True)  # their sandboxes are killed: they are gone or going
        if self.spare is not None:
            self.retired.append(self.spare[1])
            self.spare = None
        self._remove_retired()
        self.drop_pending()
        if self.factory is not None:
            self.factory.close()
            self.factory = None
        if self.session is not None:
            self.session.remove()
            self.session = None
        os.close(self.own_pid_ns)
