"""The ATP-compatible layer: the seed guide's demo run through
``spoolq.tracker`` with only its import lines changed, and the ATP
behaviours that still hold (docs/contract.md §9.1) or, where ATP was
defective, the fixed behaviour (docs/contract.md §9.2)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from spoolq import (
    InvalidName,
    NoResponse,
    Spool,
    SpoolqError,
    StaleClaim,
    State,
    TaskExists,
    TaskNotFound,
    TypeInUse,
    UnknownType,
)
from spoolq import tracker
from spoolq.tracker import *  # noqa: F403 - the guide's "Executing ATP Task" import line

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def atp_root(make_spool, spool_root: Path, monkeypatch):
    """SPOOLQ_ROOT set to a fresh spool; the tracker reopens on it."""
    make_spool(register=False)
    monkeypatch.setenv("SPOOLQ_ROOT", str(spool_root))
    yield spool_root
    if tracker._spool is not None:
        tracker._spool.close()
    tracker._spool = None


def run_in_child(target, *args, timeout: float = 60.0) -> None:
    """Run *target* in a forked process (a separate ATPD), wait for it."""

    def body() -> None:
        code = 0
        try:
            target(*args)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)

    proc = FORK.Process(target=body)
    proc.start()
    proc.join(timeout)
    assert not proc.is_alive(), "the consumer did not finish"
    assert proc.exitcode == 0


# ============================================================================= the seed demo
#
# "Simple ATP Application": the producer, as in the guide. Only the import
# line changed (and Python 3's print(); the guide's Step 5 also needs
# getTaskLog, which its import line forgot).


def simple_atp_application():
    from spoolq.tracker import \
        registerTaskType, enqueueTask, QueueFull, \
        getTaskStatusByIdentifier, getTaskResponse, deleteTaskByIdentifier, getTaskLog

    registerTaskType( "SequenceSum" , "atp_demo.handler" , 60 , 600 , 3 ) 

    while True :
        try:
            enqueueTask( "SequenceSum" , "Task001" , (1,2,3,4,5) ) 
            break
        except QueueFull : # retry if queue full 
            print( "QueueFull!" )
            time.sleep( 5 )

    return getTaskStatusByIdentifier, getTaskLog, getTaskResponse, deleteTaskByIdentifier


def poll_log_result_delete(getTaskStatusByIdentifier, getTaskLog, getTaskResponse, deleteTaskByIdentifier):
    while True :
        status = getTaskStatusByIdentifier( "SequenceSum" , "Task001" )
        print( time.asctime() , "Status: " , status[1] )
        if status[1] in ( "FINISHED" , "FAILED" ) : break 
        time.sleep( 5 ) 

    print( "Processing history:" )
    for rec in getTaskLog( "SequenceSum" , "Task001" ) :
        print( "-" , rec[0] , "Status: " , rec[1][1] , "\t" , rec[2] )

    if status[1] == "FINISHED" :
        print( "Result: " , getTaskResponse( "SequenceSum" , "Task001" ) )

    deleteTaskByIdentifier( "SequenceSum" , "Task001" ) 
    return status


# "Executing ATP Task": the ATPD loop body, as in the guide (unicode -> str);
# the guide leaves the loop out, here it ends when the queue is empty.


def atpd(SERVER_ID, QUEUE_EMPTY_QUERY_DELAY=0):
    while True:
        try:
            # get a pending task from the queue 
            taskIds = dequeueTask( SERVER_ID )  # noqa: F405
        except QueueEmpty : # no task to be processed  # noqa: F405
            return
        for taskId in taskIds:
            # create instance of TaskStatus class 
            pStatus = TaskStatus( taskId )  # noqa: F405
            try:
                # get task parameters and change status to STARTED
                requestType , requestID , requestHandler , inputs = startTask( taskId )  # noqa: F405
                # load the handler 
                module , _ , funct = requestHandler.rpartition(".")
                handler = getattr( __import__(module,fromlist=[funct]) , funct )
                # execute handler 
                handler( pStatus , inputs )
                # if no terminating status has been set do it right now 
                stopTaskSuccessIfNotFinished( taskId )  # noqa: F405
            except Exception as e :
                pStatus.setFailure( str(e) )


def test_the_seed_demo_runs_with_only_the_import_changed(atp_root: Path, capsys) -> None:
    getters = simple_atp_application()
    assert getTaskStatusByIdentifier("SequenceSum", "Task001") == (1, "ENQUEUED")  # noqa: F405
    run_in_child(atpd, "ATPD1")  # the consumer is another process, as ATPD is
    status = poll_log_result_delete(*getters)
    assert status == (5, "FINISHED")
    out = capsys.readouterr().out
    assert "Status:  FINISHED" in out
    assert "Result:  (b'15.0', 'text/xml')" in out
    history = [line for line in out.splitlines() if line.startswith("- ")]
    assert [line.split("Status:  ")[1].split()[0] for line in history] == ["ENQUEUED", "SCHEDULED", "RUNNING", "FINISHED"]
    with pytest.raises(TaskNotFound):
        getTaskStatusByIdentifier("SequenceSum", "Task001")  # noqa: F405
    assert not Path(atp_root, "done", "SequenceSum:Task001").exists()


def test_the_demo_handler_fails_bad_input_and_the_loop_records_exceptions(atp_root: Path) -> None:
    registerTaskType("SequenceSum", "atp_demo.handler")  # noqa: F405
    registerTaskType("Boom", "atp_demo.boom")  # noqa: F405
    registerTaskType("Missing", "no_such_module.handler")  # noqa: F405
    enqueueTask("SequenceSum", "bad", ("1", "x"))  # noqa: F405
    enqueueTask("Boom", "b", None)  # noqa: F405
    enqueueTask("Missing", "m", None)  # noqa: F405
    run_in_child(atpd, "ATPD1")
    for t, i, message in [
        ("SequenceSum", "bad", "Input must be a sequence of numbers!"),
        ("Boom", "b", "boom"),
        ("Missing", "m", "No module named 'no_such_module'"),
    ]:
        assert getTaskStatusByIdentifier(t, i) == (6, "FAILED")  # noqa: F405
        assert getTaskLog(t, i)[-1][1:] == ((6, "FAILED"), message)  # noqa: F405


def test_the_demo_consumer_runs_in_this_process_too(atp_root: Path) -> None:
    registerTaskType("SequenceSum", "atp_demo.handler")  # noqa: F405
    enqueueTask("SequenceSum", "t", [1.5, 2.5])  # noqa: F405
    atpd("ATPD-local")
    assert getTaskResponse("SequenceSum", "t") == (b"4.0", "text/xml")  # noqa: F405


# ============================================================================= ATP behaviours (contract §9)


def test_register_defaults_update_and_normalisation(atp_root: Path) -> None:  # contract §9.1.1
    sp = Spool(atp_root)
    registerTaskType("T", "m.f")  # noqa: F405
    t = sp.get_type("T")
    assert (t.handler, t.timeout, t.retention, t.max_restarts) == ("m.f", 3600, -1, 2)  # 3 starts, as ATP
    registerTaskType("T", "m.f", 60)  # noqa: F405
    assert sp.get_type("T").timeout == 60  # updated in place
    registerTaskType("T", "m.f", -5, 0, -4)  # noqa: F405
    t = sp.get_type("T")
    assert (t.timeout, t.retention, t.max_restarts) == (0, -1, 0)
    registerTaskType("T", "m.f", 10, 20, 5)  # noqa: F405
    assert sp.get_type("T").max_restarts == 5


def test_queue_full_writes_nothing_and_a_free_slot_accepts(make_spool, spool_root, monkeypatch) -> None:  # contract §9.1.2
    make_spool(max_queue=3, register=False)
    monkeypatch.setenv("SPOOLQ_ROOT", str(spool_root))
    tracker._spool = None
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    for i in range(2):
        enqueueTask("T", f"t{i}", i)  # noqa: F405
    enqueueTask("T", "t2", 2)  # noqa: F405 - the last free slot
    assert getQueueSize() == 3 == getMaxQueueSize()  # noqa: F405
    before = sorted(os.listdir(spool_root / "enqueued")), os.listdir(spool_root / "tmp")
    with pytest.raises(QueueFull):  # noqa: F405
        enqueueTask("T", "t3", 3)  # noqa: F405
    assert (sorted(os.listdir(spool_root / "enqueued")), os.listdir(spool_root / "tmp")) == before
    tracker._spool.close()
    tracker._spool = None


def test_unknown_type_duplicates_and_per_type_ids(atp_root: Path) -> None:  # contract §9.1.3
    with pytest.raises(UnknownType):
        enqueueTask("Nope", "a", 1)  # noqa: F405
    assert issubclass(UnknownType, LookupError)
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    registerTaskType("U", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "a", 1)  # noqa: F405
    with pytest.raises(TaskExists):
        enqueueTask("T", "a", 1)  # noqa: F405
    enqueueTask("U", "a", 2)  # noqa: F405
    assert getQueueSize() == 2  # noqa: F405


def test_enqueue_dequeue_start_status_and_log(atp_root: Path) -> None:  # contract §9.1.2, §9.1.4-5
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    with pytest.raises(QueueEmpty):  # noqa: F405
        dequeueTask("srv")  # noqa: F405
    enqueueTask("T", "A", {"in": 1}, "first")  # noqa: F405
    enqueueTask("T", "B", {"in": 2})  # noqa: F405
    assert getTaskStatusByIdentifier("T", "A") == (1, "ENQUEUED")  # noqa: F405
    (when, code, message), = getTaskLog("T", "A")  # noqa: F405
    assert code == (1, "ENQUEUED") and message == "first" and when.tzinfo is not None
    ids = dequeueTask("srv")  # noqa: F405
    assert isinstance(ids, list) and len(ids) == 1
    assert getTaskIdentifier(ids[0]) == ("T", "A")  # noqa: F405 - FIFO
    assert getTaskStatus(ids[0]) == (2, "SCHEDULED")  # noqa: F405
    assert [r[1] for r in getTaskLog("T", "A")] == [(1, "ENQUEUED"), (2, "SCHEDULED")]  # noqa: F405
    assert getQueueSize() == 1  # noqa: F405
    assert startTask(ids[0]) == ("T", "A", "atp_demo.handler", {"in": 1})  # noqa: F405
    assert getTaskStatusByIdentifier("T", "A") == (3, "RUNNING")  # noqa: F405
    assert len(getTaskLog("T", "A")) == 3  # noqa: F405
    ids_b = dequeueTask("srv")  # noqa: F405
    assert getTaskIdentifier(ids_b[0]) == ("T", "B")  # noqa: F405
    with pytest.raises(QueueEmpty):  # noqa: F405
        dequeueTask("srv")  # noqa: F405


def test_status_changes_through_task_status(atp_root: Path) -> None:  # contract §9.1.6, §9.2.6
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    for i in ("quiet", "failed", "paused"):
        enqueueTask("T", i, None)  # noqa: F405
    ids = {}
    for _ in range(3):
        (task_id,) = dequeueTask("srv")  # noqa: F405
        startTask(task_id)  # noqa: F405
        ids[getTaskIdentifier(task_id)[1]] = task_id  # noqa: F405
    stopTaskSuccessIfNotFinished(ids["quiet"])  # noqa: F405 - the handler set nothing
    assert getTaskStatus(ids["quiet"]) == (5, "FINISHED")  # noqa: F405
    TaskStatus(ids["failed"]).setFailure("x")  # noqa: F405
    stopTaskSuccessIfNotFinished(ids["failed"])  # noqa: F405
    assert getTaskStatusByIdentifier("T", "failed") == (6, "FAILED")  # noqa: F405
    assert getTaskLog("T", "failed")[-1][2] == "x"  # noqa: F405
    status = TaskStatus(ids["paused"])  # noqa: F405
    status.setPaused("waiting")
    assert status.getStatus() == (4, "PAUSED")
    stopTaskSuccessIfNotFinished(ids["paused"])  # noqa: F405
    assert getTaskStatusByIdentifier("T", "paused") == (5, "FINISHED")  # noqa: F405
    # ATP let setFailure overwrite FINISHED (contract §9.2.6); terminal states are final now.
    with pytest.raises(StaleClaim):
        TaskStatus(ids["quiet"]).setFailure("late")  # noqa: F405
    assert getTaskStatusByIdentifier("T", "quiet") == (5, "FINISHED")  # noqa: F405
    assert issubclass(StaleClaim, SpoolqError)


def test_responses_replace_data_and_mime_and_a_missing_one_is_not_found(atp_root: Path) -> None:  # contract §9.1.7
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "a", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    startTask(task_id)  # noqa: F405
    with pytest.raises(NoResponse):
        getTaskResponse("T", "a")  # noqa: F405
    assert issubclass(NoResponse, LookupError)
    status = TaskStatus(task_id)  # noqa: F405
    status.storeResponse(b"r", "text/plain")
    assert getTaskResponse("T", "a") == (b"r", "text/plain")  # noqa: F405
    status.storeResponse(b"s")  # ATP kept "text/plain" here (contract §9.2.10); the MIME type follows now
    assert getTaskResponse("T", "a") == (b"s", "text/xml")  # noqa: F405
    setTaskResponse(task_id, "t", mimeType="application/json")  # noqa: F405
    assert getTaskResponse("T", "a") == (b"t", "application/json")  # noqa: F405


def test_the_log_is_chronological_one_record_per_change(atp_root: Path) -> None:  # contract §9.1.8
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "a", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    startTask(task_id)  # noqa: F405
    pauseTask(task_id, "p")  # noqa: F405
    resumeTask(task_id, "r")  # noqa: F405
    stopTaskSuccess(task_id, "done")  # noqa: F405
    log = getTaskLog("T", "a")  # noqa: F405
    assert [(code, msg) for _, code, msg in log] == [
        ((1, "ENQUEUED"), ""), ((2, "SCHEDULED"), ""), ((3, "RUNNING"), ""),
        ((4, "PAUSED"), "p"), ((3, "RUNNING"), "r"), ((5, "FINISHED"), "done"),
    ]
    times = [t for t, _, _ in log]
    assert times == sorted(times) and all(t.tzinfo == timezone.utc for t in times)
    assert all(isinstance(t, datetime) for t in times)


def test_zombies_and_retirement_through_the_tracker(atp_root: Path, make_clock) -> None:  # contract §9.1.9-10
    clock = make_clock()
    tracker.use_spool(Spool(atp_root, clock=clock))
    registerTaskType("T", "atp_demo.handler", 2, 2, 1)  # noqa: F405
    for i in ("sched", "run", "paused", "fin", "wait"):
        enqueueTask("T", i, None)  # noqa: F405
    ids = {i: dequeueTask("srv")[0] for i in ("sched", "run", "paused", "fin")}  # noqa: F405
    for i in ("run", "paused", "fin"):
        startTask(ids[i])  # noqa: F405
    pauseTask(ids["paused"])  # noqa: F405
    stopTaskSuccess(ids["fin"])  # noqa: F405
    clock.advance(3)
    result = reenqueueZombieTasks()  # noqa: F405
    assert sorted(result) == [("reenqueued", "T::paused"), ("reenqueued", "T::run"), ("reenqueued", "T::sched")]
    for i in ("sched", "run", "paused", "wait"):
        assert getTaskStatusByIdentifier("T", i) == (1, "ENQUEUED")  # noqa: F405
    assert getTaskLog("T", "run")[-1][2] == "timed out after 2 s"  # noqa: F405
    assert getTaskStatusByIdentifier("T", "fin") == (5, "FINISHED")  # noqa: F405 - untouched
    with pytest.raises(StaleClaim):  # the old task_id lost the task
        TaskStatus(ids["run"]).setSuccess()  # noqa: F405
    running = dequeueTask("srv")[0]  # noqa: F405 - "wait" comes first: FIFO
    startTask(running)  # noqa: F405
    assert deleteRetiredTasks() == [("retired", "T::fin")]  # noqa: F405
    with pytest.raises(TaskNotFound):
        getTaskStatusByIdentifier("T", "fin")  # noqa: F405
    clock.advance(10_000)
    assert deleteRetiredTasks() == []  # noqa: F405 - a running task of any age is kept
    tracker.use_spool(None)


def test_unregister_delete_and_reenqueue(make_spool, spool_root, monkeypatch) -> None:  # contract §9.1.11-13
    make_spool(max_queue=1, register=False)
    monkeypatch.setenv("SPOOLQ_ROOT", str(spool_root))
    tracker._spool = None
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "a", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    enqueueTask("T", "b", None)  # noqa: F405 - the queue is full again
    reenqueueTask(task_id)  # noqa: F405 - never refused by the limit
    assert getQueueSize() == 2 > getMaxQueueSize()  # noqa: F405
    with pytest.raises(TypeInUse):
        unregisterTaskType("T")  # noqa: F405
    deleteTaskByIdentifier("T", "a")  # noqa: F405
    with pytest.raises(TaskNotFound):
        getTaskStatusByIdentifier("T", "a")  # noqa: F405
    deleteTaskByIdentifier("T", "never-was")  # noqa: F405 - unknown task of a known type: no-op
    with pytest.raises(UnknownType):
        deleteTaskByIdentifier("Nope", "a")  # noqa: F405
    with pytest.raises(InvalidName):
        deleteTaskByIdentifier("T", "../a")  # noqa: F405
    unregisterTaskType("T", force=True)  # noqa: F405
    with pytest.raises(UnknownType):
        enqueueTask("T", "c", None)  # noqa: F405
    assert getQueueSize() == 0  # noqa: F405
    tracker._spool.close()
    tracker._spool = None


def test_task_status_snake_case_and_free_text_log(atp_root: Path) -> None:  # contract §5.4
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "a", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    startTask(task_id)  # noqa: F405
    status = TaskStatus(task_id)  # noqa: F405
    status.log("note")
    status.set_paused()
    status.set_running()
    status.store_response("ok")
    status.set_success("fine")
    assert [m for _, _, m in getTaskLog("T", "a")][-4:] == ["note", "", "", "fine"]  # noqa: F405
    assert status.getInfo() == ("T", "a", 5, "FINISHED")
    assert getTaskInfo(task_id) == ("T", "a", 5, "FINISHED")  # noqa: F405
    assert status.info().state == State.FINISHED


# ============================================================================= ATP names moved over (issue 11)


def test_status_constants_and_tables_are_atps() -> None:
    """ATP's TaskStatus constants and its STATUS2TEXT / TEXT2STATUS tables
    (EOxServer's processes.models): codes 1..6, code 1 named ENQUEUED by
    spoolq and ACCEPTED by ATP."""
    assert (TaskStatus.ACCEPTED, TaskStatus.ENQUEUED, TaskStatus.SCHEDULED, TaskStatus.RUNNING,  # noqa: F405
            TaskStatus.PAUSED, TaskStatus.FINISHED, TaskStatus.FAILED) == (1, 1, 2, 3, 4, 5, 6)  # noqa: F405
    assert type(TaskStatus.FINISHED) is int and str(TaskStatus.FINISHED) == "5"  # noqa: F405 - plain ints, as in ATP
    assert STATUS2TEXT == {0: "UNDEFINED", 1: "ENQUEUED", 2: "SCHEDULED", 3: "RUNNING", 4: "PAUSED",  # noqa: F405
                           5: "FINISHED", 6: "FAILED"}
    assert TEXT2STATUS["ACCEPTED"] == TEXT2STATUS["ENQUEUED"] == 1  # noqa: F405
    assert all(TEXT2STATUS[name] == code for code, name in STATUS2TEXT.items())  # noqa: F405
    assert all(STATUS2TEXT[int(s)] == s.name for s in State)  # noqa: F405 - what getTaskStatus returns


def test_max_queue_size_keeps_the_atp_idiom_right(make_spool, spool_root, monkeypatch) -> None:
    """Unlimited is sys.maxsize, not 0: `while getQueueSize() < getMaxQueueSize()` enqueues."""
    make_spool(register=False)
    monkeypatch.setenv("SPOOLQ_ROOT", str(spool_root))
    tracker._spool = None
    try:
        assert getMaxQueueSize() == sys.maxsize  # noqa: F405
        registerTaskType("T", "atp_demo.handler")  # noqa: F405
        enqueued = 0
        while getQueueSize() < getMaxQueueSize() and enqueued < 3:  # noqa: F405
            enqueueTask("T", f"t{enqueued}", enqueued)  # noqa: F405
            enqueued += 1
        assert getQueueSize() == 3  # noqa: F405
        Spool.init(spool_root, max_queue=3)
        tracker._spool = None
        assert getMaxQueueSize() == 3 == getQueueSize()  # noqa: F405 - a limit is itself
    finally:
        if tracker._spool is not None:
            tracker._spool.close()
        tracker._spool = None


# An ATP program as it was written for EOxServer, with only its import line
# changed: a producer that waits while the queue is full, then polls each task
# and compares codes with TaskStatus constants and names with STATUS2TEXT.
ATP_PROGRAM = r'''
import sys, time
from spoolq.tracker import *    # was: from eoxserver.resources.processes.tracker import *

registerTaskType("SequenceSum", "atp_demo.handler", 60, 600, 3)
deadline = time.time() + float(sys.argv[1])
tasks = {"Task%03d" % i: (1, 2, i) for i in range(6)}
tasks["TaskBad"] = ("x",)
waited = 0
for ident, inputs in tasks.items():
    while getQueueSize() >= getMaxQueueSize():     # ATP's back-pressure idiom
        waited += 1
        assert time.time() < deadline, "the queue never drained"
        time.sleep(0.02)
    enqueueTask("SequenceSum", ident, inputs)
done = {}
while len(done) < len(tasks):
    assert time.time() < deadline, "not finished: %r" % sorted(set(tasks) - set(done))
    for ident in tasks:
        code, name = getTaskStatusByIdentifier("SequenceSum", ident)
        assert STATUS2TEXT[code] == name and TEXT2STATUS[name] == code
        if code in (TaskStatus.FINISHED, TaskStatus.FAILED):
            done[ident] = code
    time.sleep(0.02)
for ident, code in sorted(done.items()):
    if code == TaskStatus.FINISHED:
        print(ident, STATUS2TEXT[code], getTaskResponse("SequenceSum", ident)[0].decode())
    else:
        print(ident, STATUS2TEXT[code], getTaskLog("SequenceSum", ident)[-1][2])
print("waited" if waited else "never waited")
'''


@pytest.mark.parametrize("max_queue", [None, 2])
def test_an_atp_program_runs_against_a_real_worker(make_spool, spool_root: Path, tmp_path: Path,
                                                    max_queue: int | None) -> None:
    make_spool(register=False, max_queue=max_queue)
    here = Path(__file__).resolve().parent
    env = dict(os.environ, SPOOLQ_ROOT=str(spool_root),
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    program = tmp_path / "atp_program.py"
    program.write_text(ATP_PROGRAM)
    worker = subprocess.Popen([sys.executable, "-m", "spoolq", "--root", str(spool_root), "worker", "w1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc = subprocess.run([sys.executable, str(program), "60"], env=env, capture_output=True, timeout=120)
        worker.terminate()
        _, worker_err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert proc.returncode == 0, proc.stderr.decode()
    assert worker.returncode == 0, worker_err.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[:-1] == [f"Task{i:03d} FINISHED {3 + i:.1f}" for i in range(6)] + [
        "TaskBad FAILED Input must be a sequence of numbers!"]
    if max_queue is None:
        assert lines[-1] == "never waited"  # unlimited: the idiom never blocks


def test_dequeue_obeys_priorities_due_times_and_holds(atp_root: Path) -> None:  # contract §11.3
    """dequeueTask claims as a daemon does: higher priority first, never a
    task not due yet, never one of a held type."""
    from spoolq import Spool

    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    registerTaskType("H", "atp_demo.handler")  # noqa: F405
    spool = Spool(atp_root)
    spool.enqueue("T", "low", 1)
    spool.enqueue("T", "later", 2, priority=100, delay=3600)
    spool.enqueue("T", "high", 3, priority=5)
    spool.enqueue("H", "held", 4, priority=100)
    spool.hold("H")
    order = [getTaskIdentifier(dequeueTask("srv")[0])[1] for _ in range(2)]  # noqa: F405
    assert order == ["high", "low"]
    with pytest.raises(QueueEmpty):  # noqa: F405
        dequeueTask("srv")  # noqa: F405
    spool.release("H")
    assert getTaskIdentifier(dequeueTask("srv")[0]) == ("H", "held")  # noqa: F405
    assert getTaskStatusByIdentifier("T", "later") == (1, "ENQUEUED")  # noqa: F405


def test_use_spool_works_on_the_given_spool_wherever_spoolq_root_points(make_spool, tmp_path, monkeypatch) -> None:
    mine = make_spool()
    monkeypatch.setenv("SPOOLQ_ROOT", str(tmp_path / "elsewhere"))  # no spool there
    tracker.use_spool(mine)
    try:
        enqueueTask("T", "given", None)  # noqa: F405
        assert mine.status("T", "given").state.name == "ENQUEUED"
    finally:
        tracker.use_spool(None)


# --- an ATP application's second look (outside testing, round 3) -------------------------


def test_an_old_task_id_can_neither_delete_nor_hand_back_the_tasks_next_life(atp_root: Path) -> None:
    """§1.5, §5.3: writes through a task_id whose task was taken away are
    refused. deleteTask(old) used to delete the run another server had
    claimed since, and reenqueueTask(old) returned as if it had worked."""
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "H", {"n": 1})  # noqa: F405
    (old,) = dequeueTask("appY")  # noqa: F405
    startTask(old)  # noqa: F405
    reenqueueTask(old, "back")  # noqa: F405
    with pytest.raises(StaleClaim):
        reenqueueTask(old)  # noqa: F405 - handed back already: nothing of it to hand back
    (new,) = dequeueTask("appZ")  # noqa: F405
    startTask(new)  # noqa: F405
    with pytest.raises(StaleClaim):
        deleteTask(old)  # noqa: F405
    with pytest.raises(StaleClaim):
        reenqueueTask(old)  # noqa: F405
    assert getTaskStatusByIdentifier("T", "H") == (3, "RUNNING")  # noqa: F405 - untouched
    stopTaskSuccess(new)  # noqa: F405 - the new life's writes still work
    deleteTask(new)  # noqa: F405 - its own claim deletes it
    with pytest.raises(TaskNotFound):
        getTaskStatusByIdentifier("T", "H")  # noqa: F405
    deleteTask(new)  # noqa: F405 - gone already: a no-op, as deleteTaskByIdentifier


def test_start_keeps_its_message_and_if_not_finished_says_whether_it_changed(atp_root: Path) -> None:
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "S", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    startTask(task_id, "my start msg")  # noqa: F405
    assert getTaskLog("T", "S")[-1][1:] == ((3, "RUNNING"), "my start msg")  # noqa: F405
    assert stopTaskSuccessIfNotFinished(task_id) is True  # noqa: F405 - §6.11
    assert stopTaskSuccessIfNotFinished(task_id) is False  # noqa: F405


def test_a_change_the_state_forbids_is_wrong_state_not_a_stale_claim(atp_root: Path) -> None:
    """§5.2: StaleClaim means the claim lost its task (or it is final);
    finishing a task that is claimed but not started is WrongState."""
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "W", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    for call in (stopTaskSuccess, pauseTask, resumeTask, stopTaskSuccessIfNotFinished):  # noqa: F405
        with pytest.raises(WrongState) as caught:  # noqa: F405
            call(task_id)
        assert not isinstance(caught.value, StaleClaim) and "SCHEDULED" in str(caught.value)
    assert startTask(task_id)[:2] == ("T", "W")  # noqa: F405 - the claim is still good


def test_lookups_of_an_unknown_type_say_so(atp_root: Path) -> None:
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    for call in (getTaskStatusByIdentifier, getTaskLog, getTaskResponse):  # noqa: F405
        with pytest.raises(UnknownType):
            call("Nope", "X")
        with pytest.raises(TaskNotFound):
            call("T", "X")


def test_the_star_import_names_every_error_the_tracker_raises() -> None:
    names = set(tracker.__all__)
    assert {"NoResponse", "TaskExists", "TypeInUse", "InvalidName", "InvalidInput", "WrongState"} <= names


def test_a_program_that_runs_its_tasks_itself_keeps_the_last_progress(atp_root: Path) -> None:
    """§12.3: the last progress is kept. In the daemon the runner writes it
    when the handler returns; a program that runs the handler itself ends
    the task with setSuccess, which must write it first."""
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "P", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    startTask(task_id)  # noqa: F405
    status = TaskStatus(task_id)  # noqa: F405
    for i in range(1, 101):
        status.progress(i, 100)
    status.setSuccess()
    assert tracker._get_spool().status("T", "P").progress["done"] == 100


def test_a_zombie_sweeps_message_keeps_the_reason(atp_root: Path, make_clock) -> None:
    """§2.3: the record of a take-away says why, with the caller's message."""
    clock = make_clock()
    tracker.use_spool(Spool(atp_root, clock=clock))
    registerTaskType("T", "atp_demo.handler", timeout=2)  # noqa: F405
    enqueueTask("T", "Z", None)  # noqa: F405
    (task_id,) = dequeueTask("srv")  # noqa: F405
    startTask(task_id)  # noqa: F405
    clock.advance(3)
    assert reenqueueZombieTasks("sweep") == [("reenqueued", "T::Z")]  # noqa: F405
    assert getTaskLog("T", "Z")[-1][2] == "sweep: timed out after 2 s"  # noqa: F405
    tracker.use_spool(None)


def test_a_new_queue_limit_holds_for_a_producer_already_running(atp_root: Path) -> None:
    registerTaskType("T", "atp_demo.handler")  # noqa: F405
    enqueueTask("T", "q1", None)  # noqa: F405 - the spool is open in this process from here on
    assert getMaxQueueSize() == sys.maxsize  # noqa: F405
    Spool.init(atp_root, max_queue=1)  # another process's `spoolq init --max-queue 1`
    assert getMaxQueueSize() == 1  # noqa: F405
    with pytest.raises(QueueFull):  # noqa: F405
        enqueueTask("T", "q2", None)  # noqa: F405
