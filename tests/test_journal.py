"""The native journal protocol (contract §12.4) against a real journald: a
journald of its own namespace (``systemd-journald NS``), which this test
starts and stops; the host runs none. tests/test_systemd_integration.py
checks the same under the user manager, through the shipped unit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from spoolq.systemd import JournalHandler, encode_fields, task_fields

JOURNALD = "/lib/systemd/systemd-journald"
pytestmark = [
    pytest.mark.skipif(not Path(JOURNALD).exists() or shutil.which("journalctl") is None,
                       reason="systemd-journald is not installed (run .ci/install-system-deps)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="journald needs root"),
]


@pytest.fixture
def journal():
    namespace = f"spoolqt{uuid.uuid4().hex[:8]}"
    run_dir = Path(f"/run/systemd/journal.{namespace}")
    proc = subprocess.Popen([JOURNALD, namespace], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (run_dir / "socket").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "journald did not start"
        time.sleep(0.05)

    def entries(*match: str) -> list[dict]:
        done = subprocess.run(["journalctl", f"--namespace={namespace}", "-o", "json", "--no-pager", "--all",
                               *match], capture_output=True, text=True, timeout=60)
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    yield str(run_dir / "socket"), entries
    proc.terminate()
    proc.wait(20)
    shutil.rmtree(run_dir, ignore_errors=True)
    for d in Path("/var/log/journal").glob(f"*.{namespace}"):
        shutil.rmtree(d, ignore_errors=True)


class Claim:
    type, id, server = "T", "Task007", "w1"


def wait_for(entries, *match, count=1):
    deadline = time.monotonic() + 20
    while True:
        found = entries(*match)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_fields_newlines_and_a_message_too_large_for_a_datagram(journal):
    path, entries = journal
    fallback = logging.StreamHandler(sys.stderr)  # nothing may reach it: journald takes all
    handler = JournalHandler(fallback, path=path)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("spoolq.test-journal")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("re-enqueued %s", "T:Task007", extra=task_fields(Claim(), "ENQUEUED"))
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed T:Task007", extra=task_fields(Claim(), "FAILED"))
        big = "x" * (600 << 10)  # over a datagram's limit: sent in a sealed memfd
        logger.info("big %s", big, extra=task_fields(Claim()))
        logger.info("about no task")
    finally:
        logger.removeHandler(handler)
        handler.close()
    found = wait_for(entries, "SPOOLQ_ID=Task007", count=3)
    assert [e["SPOOLQ_STATE"] if "SPOOLQ_STATE" in e else None for e in found] == ["ENQUEUED", "FAILED", None]
    assert all(e["SPOOLQ_TYPE"] == "T" and e["SPOOLQ_SERVER"] == "w1" for e in found)
    assert [e["PRIORITY"] for e in found] == ["4", "3", "6"]
    assert "Traceback" in found[1]["MESSAGE"] and "ValueError: boom" in found[1]["MESSAGE"]  # one entry, newlines kept
    assert len(found[2]["MESSAGE"]) == len("spoolq.test-journal: big ") + (600 << 10)
    plain = wait_for(entries, "MESSAGE=spoolq.test-journal: about no task")
    assert len(plain) == 1 and "SPOOLQ_ID" not in plain[0] and plain[0]["SYSLOG_IDENTIFIER"] == "spoolq"


def test_without_journald_the_line_goes_to_the_fallback(tmp_path):
    out = tmp_path / "err"
    with open(out, "w") as stream:
        fallback = logging.StreamHandler(stream)
        handler = JournalHandler(fallback, path=str(tmp_path / "no-socket"))
        logger = logging.getLogger("spoolq.test-journal-fallback")
        logger.propagate = False
        logger.addHandler(handler)
        logger.error("still said")
        logger.removeHandler(handler)
        handler.close()
    assert out.read_text() == "still said\n"


def test_encoding():
    assert encode_fields([("MESSAGE", "a"), ("X", "b\nc")]) == b"MESSAGE=a\nX\n\x03\x00\x00\x00\x00\x00\x00\x00b\nc\n"


def test_the_worker_sends_task_fields_under_journald(journal, tmp_path):
    """A worker whose stderr is the journal (JOURNAL_STREAM names it) and
    whose native socket is this journald's: every line about a task carries
    its fields."""
    path, entries = journal
    root = tmp_path / "spool"
    from spoolq import Spool

    spool = Spool.init(root, durable=False)
    spool.register_type("T", "spoolq.demo.sequence_sum")
    spool.enqueue("T", "Task001", (1, 2))
    here = Path(__file__).resolve().parent
    err = tmp_path / "stderr"
    st_file = open(err, "w")
    st = os.fstat(st_file.fileno())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]),
           "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    script = ("import sys, spoolq.systemd as s; s.JOURNAL_SOCKET = sys.argv[1]; "
              "from spoolq.worker import run_worker; sys.exit(run_worker(sys.argv[2], 'w1'))")
    proc = subprocess.Popen([sys.executable, "-c", script, path, str(root)], env=env, stderr=st_file)
    try:
        found = wait_for(entries, "SPOOLQ_ID=Task001", count=3)
    finally:
        proc.terminate()
        proc.wait(20)
        st_file.close()
    assert [e.get("SPOOLQ_STATE") for e in found] == ["SCHEDULED", "RUNNING", "FINISHED"], found
    assert {e["SPOOLQ_SERVER"] for e in found} == {"w1"}
    assert err.read_text() == ""  # nothing went to the stream: it all went to the journal
