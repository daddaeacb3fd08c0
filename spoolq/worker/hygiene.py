"""What a handler may change in the process that runs it, put back before
the next task.

A handler process (a fork slot, a Dask slot) runs many tasks one after
another, so whatever process-wide state a handler changes would reach the
tasks after it, which are not its own: a closed ``sys.stdout`` fails every
later ``print``, a pending ``alarm()`` kills the process in the middle of
another task, a cleared environment or a umask of 0777 breaks the next
handler or the files the spool writes for it. :class:`ProcessState` takes
the state the slot was born with (:meth:`ProcessState.take`) and, after
each run, compares and puts back (:meth:`ProcessState.restore`):

* the standard streams (``sys.stdin``, ``sys.stdout``, ``sys.stderr``),
  replaced or closed: opened afresh on fds 0, 1 and 2 (and so are the
  logging handlers that wrote to a closed one); fd 0 itself, closed or
  replaced (fds 1 and 2 the output capture puts back after each run);
* the environment, the umask, the working directory;
* the dispositions of the signals a slot relies on, the signal mask, and
  the interval timers (``alarm``, ``setitimer``), cancelled;
* logging (``logging.disable``; the level, handlers, ``propagate`` and
  ``disabled`` of the root logger and of every logger the slot was born
  with: spoolq's own, whose lines the worker relies on, among them) and the
  recursion limit;
* the interpreter's shared settings: the warnings filters, ``sys.path``, the
  modules the slot was born with in ``sys.modules`` (a handler that set
  ``sys.modules["pickle"] = None`` broke the next task's start), garbage
  collection switched off, ``sys.excepthook`` and ``threading.excepthook``,
  the int-to-str digit limit, the socket default timeout, and the time
  zone (``time.tzset`` after the environment is put back);
* the resource limits and the niceness: lowered soft limits are raised
  back; a hard limit, which an unprivileged process cannot raise again, or
  a niceness it cannot lower again, cannot be put back: then the slot must
  retire (the worker forks a fresh one). So must a slot whose user or group
  ids changed (a handler that dropped privileges can no longer write the
  spool). (A task of a type with limits
  retires its slot anyway: :mod:`.limits`.)

Cost per task: a handful of system calls (fd 0, the umask, the working
directory, three timers, the signal mask, the niceness, one ``getrlimit``
per limit) and some comparisons: 27 us with a service's environment of 6
variables, 60-70 us with 38 (comparing ``os.environ`` decodes each
variable); the interpreter's settings and the loggers about 25 us more
(measured on a busy machine, 180 modules and 9 loggers). What it does not cover:
module-level state of imported code (a handler that monkeypatches a
library, or leaves an object whose finaliser exits the process, changes it
for the next task, as in any long-lived worker process: a type registered
with limits, whose slot retires after each task, is the way out) and
descriptors it leaves open (its leftovers are killed by the
runner; descriptors are the handler's own to close). A thread a handler
leaves running cannot be put back: the process retires after the task
(one ``stat`` before and after the run counts the threads).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import proctree

log = logging.getLogger("spoolq.hygiene")

# The signals whose disposition matters to a slot or to the next handler:
# the ones that stop or kill a process by default, and SIGCHLD/SIGPIPE.
_SIGNALS = tuple(
    sig for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
                     "SIGPROF", "SIGCHLD", "SIGPIPE", "SIGXCPU", "SIGXFSZ", "SIGTSTP", "SIGTTIN", "SIGTTOU")
    if (sig := getattr(signal, name, None)) is not None
)
_TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_LIMITS = tuple(
    value for name in ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC",
                       "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_MEMLOCK")
    if (value := getattr(resource, name, None)) is not None
)
_STREAMS = (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w"))


@dataclass
class Restored:
    """What :meth:`ProcessState.restore` found changed and put back, and
    what it could not put back (then the process must retire)."""

    changed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def retire(self) -> bool:
        return bool(self.kept)

    def note(self, what: str, *, put_back: bool = True) -> None:
        into = self.changed if put_back else self.kept
        if what not in into:
            into.append(what)


class ProcessState:
    """The process-wide state a slot was born with; see the module's docstring."""

    def __init__(self) -> None:
        self.streams: dict[str, TextIO | None] = {}
        self.stdin: tuple[int, int] | None = None  # what fd 0 is (None: it was closed)
        self.stdin_copy = -1  # a copy of it, to put back on fd 0
        self.environ: dict[str, str] = {}
        self.umask = 0o022
        self.cwd = ""
        self.cwd_fd = -1
        self.handlers: dict[int, Any] = {}
        self.mask: set[int] = set()
        self.disable = logging.NOTSET
        self.root_level = logging.WARNING
        self.root_handlers: list[logging.Handler] = []
        self.loggers: dict[str, tuple[Any, ...]] = {}  # name -> what _logger_state says
        self.recursion = 1000
        self.interpreter: dict[str, Any] = {}  # what _interpreter() says
        self.modules: dict[str, Any] = {}
        self.limits: dict[int, tuple[int, int]] = {}
        self.niceness = 0
        self.ids: tuple[Any, ...] = ()
        self.threads = 0  # threads of the process as the handler was called (:meth:`before_run`)
        self.retire = False  # something could not be put back: the process must not run another task

    @classmethod
    def take(cls) -> ProcessState:
        """The state of this process now (a slot, before its first task)."""
        state = cls()
        state.streams = {name: getattr(sys, name) for name, _, _ in _STREAMS}
        state.stdin = _identity(0)
        if state.stdin is not None:
            state.stdin_copy = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
        state.environ = dict(os.environ)
        state.umask = os.umask(0o022)
        os.umask(state.umask)
        try:
            state.cwd = os.getcwd()
            state.cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass  # born in a directory that is gone: nothing to go back to
        state.handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        state.mask = set(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        state.disable = logging.root.manager.disable
        state.root_level = logging.root.level
        state.root_handlers = list(logging.root.handlers)
        state.loggers = {name: _logger_state(logger) for name, logger in _loggers()}
        state.recursion = sys.getrecursionlimit()
        state.interpreter = _interpreter()
        state.modules = dict(sys.modules)
        state.limits = {which: resource.getrlimit(which) for which in _LIMITS}
        state.niceness = os.getpriority(os.PRIO_PROCESS, 0)
        state.ids = _ids()
        return state

    def before_run(self) -> None:
        """Right before a handler is called: what :meth:`restore` compares
        that is not the slot's own (the threads it runs, output capture's
        included)."""
        self.threads = proctree.thread_count()

    def put_back(self, claim: object) -> None:
        """Right after *claim*'s handler returned (before its end is written,
        which a umask of 0777 would spoil): put back what it changed, say so
        in one line; :attr:`retire` once something could not be."""
        try:
            done = self.restore()
        except Exception as exc:  # noqa: BLE001 - a state no test foresaw: a fresh process is safe
            done = Restored(kept=[f"state ({type(exc).__name__}: {exc})"])
        self.retire = self.retire or done.retire
        if done.changed:
            log.warning("%s: its handler changed its process's %s; put back", claim, ", ".join(done.changed))
        if done.kept:
            log.warning("%s: its handler changed its process's %s, which cannot be put back: "
                        "the process retires after the task", claim, ", ".join(done.kept))

    def restore(self) -> Restored:
        """Compare this process with the state taken and put back what a run
        changed; what was changed, and whether the slot must retire."""
        done = Restored()
        self._streams(done)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
            time.tzset()  # a TZ it set (and tzset) would go on in time.localtime
            done.note("environment")
        if os.umask(self.umask) != self.umask:
            done.note("umask")
        self._cwd(done)
        self._signals(done)
        self._logging(done)
        if sys.getrecursionlimit() != self.recursion:
            sys.setrecursionlimit(self.recursion)
            done.note("recursion limit")
        self._interpreter(done)
        self._limits(done)
        if self.threads and proctree.thread_count() > self.threads:
            # A thread the handler left running would go on inside the next
            # task (print into its output, report its progress, exit its
            # process): it cannot be stopped from outside, only left behind.
            done.note("threads (one left running)", put_back=False)
        if _ids() != self.ids:
            # A handler that dropped privileges leaves a process that can no
            # longer write the spool; one that gained them, one that should
            # not run the next task. Never put back: retired.
            done.note("user or group ids", put_back=False)
        return done

    def _streams(self, done: Restored) -> None:
        # fd 0 itself (fds 1 and 2 are the capture's to put back): closed,
        # its number would go to the next file this process opens, and the
        # next handler's stdin would be that file.
        if self.stdin_copy >= 0 and _identity(0) != self.stdin:
            os.dup2(self.stdin_copy, 0, inheritable=True)
            done.note("fd 0")
        for name, fd, mode in _STREAMS:
            born = self.streams.get(name)
            now = getattr(sys, name)
            if now is born and (born is None or not born.closed):
                continue
            if born is None or born.closed:
                born = self.streams[name] = _reopen(fd, mode, born)
            setattr(sys, name, born)
            done.note(f"sys.{name}")
        if not done.changed:
            return
        # Logging handlers that wrote to a stream now closed write to its
        # new self (the daemon's own handler is on the "spoolq" logger).
        fresh = {fd: self.streams[name] for name, fd, _ in _STREAMS}
        loggers = [logging.root, *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger))]
        for logger in loggers:
            for handler in logger.handlers:
                stream = getattr(handler, "stream", None)
                if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                    try:
                        fd = stream.fileno()
                    except (OSError, ValueError):
                        fd = 2
                    replacement = fresh.get(fd, fresh[2])
                    if replacement is not None:
                        with handler.lock or contextlib.nullcontext():
                            handler.stream = replacement  # (setStream would flush the closed one)

    def _cwd(self, done: Restored) -> None:
        if self.cwd_fd < 0:
            return
        try:
            if os.getcwd() == self.cwd:
                return
        except OSError:
            pass  # its working directory was removed
        try:
            os.fchdir(self.cwd_fd)
            done.note("working directory")
        except OSError:
            done.note("working directory", put_back=False)

    def _signals(self, done: Restored) -> None:
        changed = [sig for sig in _SIGNALS if signal.getsignal(sig) != self.handlers[sig]]
        for sig in changed:
            handler = self.handlers[sig]
            if handler is not None:  # None: set outside Python; left as it was
                signal.signal(sig, handler)
        if changed:
            done.note("signal handlers")
        if set(signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)) != self.mask:
            done.note("signal mask")
        if any(signal.setitimer(which, 0) != (0.0, 0.0) for which in _TIMERS):
            done.note("timers")

    def _logging(self, done: Restored) -> None:
        root = logging.root
        if root.manager.disable != self.disable or root.level != self.root_level \
                or root.handlers != self.root_handlers:
            logging.disable(self.disable)
            root.setLevel(self.root_level)
            root.handlers[:] = self.root_handlers
            done.note("logging")
        for name, logger in _loggers():
            born = self.loggers.get(name)
            if born is not None and _logger_state(logger) != born:
                level, handlers, propagate, disabled = born
                logger.setLevel(level)
                for handler in logger.handlers:
                    if handler not in handlers:
                        handler.close()  # (its file stayed open)
                logger.handlers[:] = handlers
                logger.propagate, logger.disabled = propagate, disabled
                done.note("logging")

    def _interpreter(self, done: Restored) -> None:
        now = _interpreter()
        if now != self.interpreter:
            _set_interpreter(self.interpreter, now)
            done.note("interpreter settings (" + ", ".join(k for k in self.interpreter if now.get(k) != self.interpreter[k]) + ")")
        modules = sys.modules
        changed = [name for name, module in self.modules.items() if modules.get(name) is not module]
        for name in changed:
            modules[name] = self.modules[name]
        # An entry set to None blocks every later import of that module
        # (sys.modules["pickle"] = None), one the slot had not imported yet too.
        blocked = [name for name, module in list(modules.items()) if module is None and name not in self.modules]
        for name in blocked:
            del modules[name]
        if changed or blocked:
            done.note("sys.modules")

    def _limits(self, done: Restored) -> None:
        if os.getpriority(os.PRIO_PROCESS, 0) != self.niceness:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, self.niceness)
                done.note("niceness")
            except OSError:  # only a privileged process may lower it again
                done.note("niceness", put_back=False)
        for which, born in self.limits.items():
            now = resource.getrlimit(which)
            if now == born:
                continue
            try:
                resource.setrlimit(which, born)
                done.note("resource limits")
            except (OSError, ValueError):
                done.note("resource limits", put_back=False)


def _loggers() -> list[tuple[str, logging.Logger]]:
    return [(name, x) for name, x in list(logging.root.manager.loggerDict.items()) if isinstance(x, logging.Logger)]


def _logger_state(logger: logging.Logger) -> tuple[Any, ...]:
    return logger.level, list(logger.handlers), logger.propagate, logger.disabled


def _interpreter() -> dict[str, Any]:
    """Interpreter-wide settings a handler may change for every task after
    it (compared by value; the warnings filters as a tuple of their entries)."""
    import warnings

    state: dict[str, Any] = {
        "warnings": tuple(warnings.filters),
        "sys.path": tuple(sys.path),
        "garbage collection": gc.isenabled(),
        "sys.excepthook": sys.excepthook,
        "threading.excepthook": sys.modules["threading"].excepthook if "threading" in sys.modules else None,
    }
    if hasattr(sys, "get_int_max_str_digits"):
        state["int digits"] = sys.get_int_max_str_digits()
    if "socket" in sys.modules:
        state["socket timeout"] = sys.modules["socket"].getdefaulttimeout()
    return state


def _set_interpreter(born: dict[str, Any], now: dict[str, Any]) -> None:
    import warnings

    if now.get("warnings") != born["warnings"]:
        warnings.resetwarnings()  # (which also tells the module's caches the filters changed)
        warnings.filters[:] = list(born["warnings"])
    if now.get("sys.path") != born["sys.path"]:
        sys.path[:] = list(born["sys.path"])
    if not gc.isenabled() and born["garbage collection"]:
        gc.enable()
    sys.excepthook = born["sys.excepthook"]
    if born["threading.excepthook"] is not None:
        sys.modules["threading"].excepthook = born["threading.excepthook"]
    if "int digits" in born:
        sys.set_int_max_str_digits(born["int digits"])
    if "socket" in sys.modules:
        sys.modules["socket"].setdefaulttimeout(born.get("socket timeout"))


def _identity(fd: int) -> tuple[int, int] | None:
    """(device, inode) of what *fd* is open on; None if it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ids() -> tuple[Any, ...]:
    return os.getresuid(), os.getresgid(), sorted(os.getgroups())


def _reopen(fd: int, mode: str, old: TextIO | None) -> TextIO:
    """A fresh text stream on *fd* (left open when the stream is closed),
    like the one Python made at start-up."""
    encoding = getattr(old, "encoding", None) or "utf-8"
    errors = getattr(old, "errors", None) or "strict"
    try:
        os.fstat(fd)
    except OSError:  # the descriptor itself was closed: /dev/null in its place
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd, inheritable=True)
            os.close(null)
    raw = io.FileIO(fd, mode, closefd=False)
    buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=mode == "w")

