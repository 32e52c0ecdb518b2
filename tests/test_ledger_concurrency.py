"""Eight processes appending at once lose nothing; a process killed mid-append leaves no
partial entry. On SQLite (WAL) and PostgreSQL."""

import multiprocessing as mp
import os
import signal
import time

from ledger import keys
from ledger.entry import Action, Event
from ledger.store import Ledger
from ledger.verify import verify_ledger

PROCS = 8
PER_PROC = 1000
BATCH = 10  # entries per transaction; every entry is still sealed and signed on its own


def _event(worker: int, i: int) -> Event:
    return Event(
        actor=f"site-{worker}",
        action=Action.TRAIN,
        job="conc",
        round=i,
        site=f"site-{worker}",
        idempotency_key=f"conc/{worker}/{i}",
        privacy={"epsilon_cumulative": i / 1000},
        details={"i": i},
        personal={"note": f"free text {i}"} if i % 100 == 0 else {},
        subject=f"subject-{worker}" if i % 100 == 0 else None,
    )


def _appender(url: str, worker: int, start: mp.Event, n: int) -> None:
    signer = keys.generate(f"site-{worker}")
    ledger = Ledger(url)
    start.wait()
    for i in range(0, n, BATCH):
        ledger.append_many([(_event(worker, j), signer) for j in range(i, min(i + BATCH, n))])


def test_eight_processes_lose_nothing_and_the_chain_verifies(url):
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_appender, args=(url, w, start, PER_PROC)) for w in range(PROCS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    ledger = Ledger(url)
    report = verify_ledger(url)
    # every event plus one register_key entry per process
    assert report.entries == ledger.size() == PROCS * PER_PROC + PROCS
    assert report.personal_fields == PROCS * PER_PROC // 100
    keys_seen = {b["idempotency_key"] for b in ledger.events(action="train")}
    assert keys_seen == {f"conc/{w}/{i}" for w in range(PROCS) for i in range(PER_PROC)}


def _forever(url: str, ready: mp.Event) -> None:
    signer = keys.generate("site-k")
    ledger = Ledger(url)
    i = 0
    while True:
        ledger.append_many(
            [
                (
                    Event(
                        actor="site-k",
                        action=Action.TRAIN,
                        job="kill",
                        round=j,
                        site="site-k",
                        idempotency_key=f"kill/{j}",
                        personal={"note": "x" * 2000},
                        subject="s",
                    ),
                    signer,
                )
                for j in range(i, i + 50)
            ]
        )
        i += 50
        if i >= 100:
            ready.set()


def test_a_process_killed_mid_append_leaves_no_partial_entry(url):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_forever, args=(url, ready))
    proc.start()
    assert ready.wait(120)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    report = verify_ledger(url)  # also checks every payload row has its entry and vice versa
    ledger = Ledger(url)
    assert report.entries == ledger.size()
    # whole batches only: the register_key entry plus multiples of 50
    assert (report.entries - 1) % 50 == 0 and report.entries > 100
    assert report.personal_fields == report.entries - 1
    # and the ledger keeps working afterwards
    ledger.append(
        Event(actor="site-z", action=Action.JOB_END, job="kill", idempotency_key="kill/end"),
        keys.generate("site-z"),
    )
    verify_ledger(url)
