"""Handlers for tests/test_hostile.py (run in the daemon's children)."""

from __future__ import annotations

import os
import signal
import sys
import time


def wait_for_file(ts, inp):
    """Run until the file inp["go"] exists (at most 60 s), then store a
    response: a task that is RUNNING for as long as a test needs."""
    open(inp["started"], "a").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(inp["go"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    ts.store_response("done " * 100, "text/plain")


def _note(inp, event, pid=None):
    """Append "<event> <pid> <time>" to inp["record"] (O_APPEND, one write)."""
    line = f"{event} {pid or os.getpid()} {time.time():.6f}\n"
    fd = os.open(inp["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _tick_forever(inp, event="tick"):
    while True:
        _note(inp, event)
        time.sleep(0.05)


def tick_first_time(ts, inp):
    """First run: records "start" and ticks until killed. Later runs: a
    "start", then returns at once."""
    _note(inp, "start")
    marker = inp["marker"]
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    _tick_forever(inp)


def escape_group(ts, inp):
    """Starts a grandchild that leaves the process group (setsid) and ticks;
    then returns (inp["then"] == "return") or hangs until killed."""
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:  # double fork: reparented away from the handler
            try:
                # Whole or not at all: the handler returns (and its leftovers
                # are killed) as soon as the file exists.
                with open(inp["pidfile"] + ".tmp", "w") as fh:
                    fh.write(str(os.getpid()))
                os.rename(inp["pidfile"] + ".tmp", inp["pidfile"])
                _tick_forever(inp, "escaped")
            finally:
                os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    deadline = time.monotonic() + 10
    while not os.path.exists(inp["pidfile"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    if inp.get("then") == "return":
        return
    _tick_forever(inp)


def fork_helper_then_hang(ts, inp):
    """First run: forks a helper (no exec) that sleeps for good, records its
    pid, then hangs. Later runs return at once."""
    marker = inp["marker"]
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    if os.fork() == 0:
        try:
            with open(inp["pidfile"] + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.rename(inp["pidfile"] + ".tmp", inp["pidfile"])
            time.sleep(1000)
        finally:
            os._exit(0)
    time.sleep(1000)


def release_all_flocks_then_hang(ts, inp):
    """Drops every flock it can reach on fds 3..255, then hangs."""
    import fcntl

    for fd in range(3, 256):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
    open(inp["started"], "a").close()
    time.sleep(1000)


def clobber_own_status(ts, inp):
    """Overwrites its own status.json with garbage, then returns."""
    path = ts.info().path
    with open(os.path.join(path, "status.json"), "w") as fh:
        fh.write("{not json")


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def raise_unprintable(ts, inp):
    _note(inp, "start")
    raise _Unprintable()


def succeed_then_raise(ts, inp):
    ts.set_success("all good")
    raise ValueError("after the fact")


def record_pid(ts, inp):
    _note(inp, "start")


def change_process(ts, inp):
    """Change one piece of its process's state (inp["what"]) and return: a
    process that runs task after task must not pass it on (.hygiene)."""
    import logging
    import resource
    import shutil
    import tempfile

    what = inp["what"]
    if what == "streams":
        sys.stdout.close()
        sys.stderr.close()
    elif what == "fd 0":
        os.close(0)  # its number goes to the next file the process opens
    elif what == "environment":
        os.environ.clear()
    elif what == "umask":
        os.umask(0o777)
    elif what == "working directory":
        gone = tempfile.mkdtemp()
        os.chdir(gone)
        shutil.rmtree(gone)
    elif what == "signal handlers":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif what == "timers":
        signal.alarm(1)  # would kill the process during the next task
    elif what == "logging":
        logging.disable(logging.CRITICAL)
    elif what == "niceness":
        os.nice(5)
    elif what == "resource limits":  # hard: cannot be raised again without privilege
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    elif what == "thread":  # would print into the next task's output, in its process
        import threading

        def chatter():
            for _ in range(2000):
                try:
                    # print, not os.write(1): what a handler prints goes
                    # through sys.stdout, which the next run captures too.
                    print("LEAK", flush=True)
                except (OSError, ValueError):
                    pass  # a stream of the run that ended
                time.sleep(0.005)

        threading.Thread(target=chatter, daemon=True).start()
    elif what == "user ids":  # root dropping privileges: the process can no longer write the spool
        os.setgid(65534)
        os.setuid(65534)
    elif what == "sys.modules":  # the next task's start could not import pickle (an outside tester's)
        sys.modules["pickle"] = None
    elif what == "warnings":  # the next task's harmless warning became its failure
        import warnings

        warnings.simplefilter("error")
    elif what == "spoolq logger":  # the worker's lines about later tasks vanished
        spoolq_logger = logging.getLogger("spoolq")
        spoolq_logger.setLevel(51)
        spoolq_logger.disabled = True
        spoolq_logger.propagate = False
    elif what == "interpreter":
        import gc
        import socket

        gc.disable()
        socket.setdefaulttimeout(0.001)
        sys.path.insert(0, "/nonexistent")
        sys.set_int_max_str_digits(640)
    elif what == "time zone":  # the environment is put back; time.tzname went on saying IST
        os.environ["TZ"] = "Asia/Kolkata"
        time.tzset()


def check_process(ts, inp):
    """Record its pid; fail unless its process is as a fresh one would be."""
    import logging
    import resource

    _note(inp, "check")
    print("stdout works", flush=True)
    assert os.environ.get("PATH"), "the environment is gone"
    if inp.get("stdin"):
        st = os.fstat(0)
        assert [st.st_dev, st.st_ino] == inp["stdin"], "fd 0 is not what the process was born with"
    mask = os.umask(0o022)
    os.umask(mask)
    assert mask == inp["umask"], oct(mask)
    assert os.getcwd() == inp["cwd"], os.getcwd()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert not logging.root.manager.disable
    assert os.getpriority(os.PRIO_PROCESS, 0) == inp["nice"]
    assert resource.getrlimit(resource.RLIMIT_CORE) == tuple(inp["core"])
    import gc
    import pickle  # noqa: F401 - importable again
    import socket
    import warnings

    assert not any(f[0] == "error" for f in warnings.filters), warnings.filters  # a warning stays a warning
    assert not logging.getLogger("spoolq").disabled and logging.getLogger("spoolq").level < 51
    assert gc.isenabled() and socket.getdefaulttimeout() is None and "/nonexistent" not in sys.path
    assert sys.get_int_max_str_digits() != 640 and "IST" not in time.tzname, time.tzname
    time.sleep(inp.get("seconds", 0))


def huge_failure(ts, inp):
    """Fails with an exception text of 20 MB (over the 16 MiB read limit)."""
    raise ValueError("z" * 20_000_000)


def huge_running_message(ts, inp):
    """Sets a 17 MB message on its RUNNING status, then returns."""
    ts.set_running("m" * 17_000_000)


def symlink_own_log(ts, inp):
    """Replaces its own log with a symlink to a file outside the spool."""
    log = os.path.join(ts.info().path, "log")
    os.unlink(log)
    os.symlink(inp["victim"], log)


def success_then_hang(ts, inp):
    """Gives its task its final state, then overruns its time limit."""
    ts.set_success("done early")
    time.sleep(100)


def leave_child_with_few_fds(ts, inp):
    """Forks a child that sleeps, records its pid, then lowers its own
    open-files limit to 3 (its soft limit only) and returns."""
    import resource

    child = os.fork()
    if child == 0:
        try:
            time.sleep(1000)
        finally:
            os._exit(0)
    with open(inp["pidfile"] + ".tmp", "w") as fh:
        fh.write(str(child))
    os.rename(inp["pidfile"] + ".tmp", inp["pidfile"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def raise_stale_claim(ts, inp):
    """A StaleClaim that is not about this run's claim (raised by the
    handler itself, or from a context it kept from an earlier task)."""
    import spoolq

    raise spoolq.StaleClaim("raised by the handler itself")


def fork_child_raises(ts, inp):
    """Its forked child raises out of the handler; the parent waits for it
    and returns."""
    pid = os.fork()
    if pid == 0:
        raise ValueError("the child raises")
    os.waitpid(pid, 0)
    _note(inp, "parent-done")


def break_json(ts, inp):
    """Monkeypatch what its process's own protocol uses (hygiene does not
    cover module attributes): the process then fails on its own."""
    import json

    json.dumps = None
    json.loads = None
