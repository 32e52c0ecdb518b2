"""Ledger benchmark figures for `medfed bench --json`; `run(workdir)` takes well under a minute.

- ledger_appends_per_s_sqlite: durable (WAL, synchronous=FULL) appends through `append_many`
  in transactions of 500, every entry canonicalized, chained and Ed25519-signed on its own.
- ledger_verify_1m_chain_merkle_s: read 1,000,000 entries from SQLite, recompute every leaf
  hash, chain link and indexed column, the Merkle root and the signed checkpoint over them
  (signatures not checked: the 1M log is synthesized with placeholder signatures, because
  signing 1M entries would take longer than the measurement).
- ledger_verify_100k_with_signatures_s: the full verification of 100,000 really signed entries
  (canonical form and Ed25519 signature of each, in worker processes, plus all of the above).
- inclusion_proof_bytes_ratio: mean audit-path bytes over 32 * ceil(log2 n), n = 1,000,000.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from ledger import jcs, keys, merkle, note
from ledger.entry import Action, Event, b64, leaf_hash
from ledger.proof import proof_bytes
from ledger.store import Ledger, registration, seal
from ledger.verify import verify_ledger

ORIGIN = "medfed.bench/log"


def run(
    workdir: Path | None = None,
    *,
    entries: int = 1_000_000,
    signed_entries: int = 100_000,
    appends: int = 5000,
) -> dict[str, float]:
    """The figures above; the sizes are parameters only so tests can run it small."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        figures = {"ledger_appends_per_s_sqlite": appends_per_s(root / "appends.db", n=appends)}
        figures["ledger_verify_1m_chain_merkle_s"] = verify_seconds(
            root / "1m.db", entries, signed=False
        )
        figures["ledger_verify_100k_with_signatures_s"] = verify_seconds(
            root / "100k.db", signed_entries, signed=True
        )
        figures["inclusion_proof_bytes_ratio"] = proof_ratio(entries)
    return figures


def appends_per_s(path: Path, n: int = 5000, batch: int = 500) -> float:
    ledger = Ledger(f"sqlite:///{path}")
    signer = keys.generate("site-bench")
    ledger.append(_event(-1), signer)  # registration out of the timing
    start = time.perf_counter()
    for i in range(0, n, batch):
        ledger.append_many([(_event(j), signer) for j in range(i, i + batch)])
    return n / (time.perf_counter() - start)


def _event(i: int) -> Event:
    return Event(
        actor="site-bench",
        action=Action.TRAIN,
        job="bench",
        round=i,
        site="site-bench",
        idempotency_key=f"bench/r{i}/site-bench/train",
        inputs={"dataset": "da" * 32, "global_model": "9b" * 32},
        outputs={"local_model": "1c" * 32},
        privacy={
            "release": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20},
            "epsilon_round": 0.4,
            "epsilon_cumulative": 0.4 * (i + 2),
            "epsilon_budget": 8.0,
            "delta": 1e-5,
            "accountant": "rdp",
        },
        details={"samples": 160, "epochs": 1},
    )


def synthesize(path: Path, n: int, *, signed: bool) -> str:
    """A valid n-entry ledger (register_key + n-1 train entries) and one checkpoint; returns
    the log's vkey. Bodies come from a canonical template (asserted equal to JCS)."""
    url = f"sqlite:///{path}"
    Ledger(url)  # schema
    site, log = keys.generate("site-bench"), keys.generate("medfed-log")
    reg = seal(
        registration(site, "bench"),
        site,
        seq=0,
        prev_hash=bytes(32),
        recorded="2026-01-01T00:00:00.000000Z",
    )
    marker = _event(0)
    probe = seal(
        marker, site, seq=1, prev_hash=b"\xaa" * 32, recorded="2026-01-01T00:00:00.000000Z"
    ).body.decode()
    tmpl = probe.replace("%", "%%")
    for old, new in (
        ('"seq":1,', '"seq":%d,'),
        ('"' + "aa" * 32 + '"', '"%s"'),
        ('"round":0,', '"round":%d,'),
        ("bench/r0/", "bench/r%d/"),
        ('"epsilon_cumulative":0.8', '"epsilon_cumulative":%s'),
    ):
        tmpl = tmpl.replace(old, new)
    fake_sig = b64(bytes(64))
    rows = [
        (
            0,
            registration(site, "bench").idempotency_key,
            "site-bench",
            "register_key",
            "bench",
            None,
            None,
            "2026-01-01T00:00:00.000000Z",
            reg.body.decode(),
            reg.entry_hash.hex(),
            b64(reg.signature),
        )
    ]
    hashes = [reg.entry_hash]
    prev = reg.entry_hash.hex()
    sha = hashlib.sha256
    for seq in range(1, n):
        r = seq - 1
        body = _fill(tmpl, seq=seq, r=r, prev=prev).encode()
        h = sha(b"\x00" + body).digest()
        hashes.append(h)
        prev = h.hex()
        sig = b64(site.sign(body)) if signed else fake_sig
        rows.append(
            (
                seq,
                f"bench/r{r}/site-bench/train",
                "site-bench",
                "train",
                "bench",
                r,
                "site-bench",
                "2026-01-01T00:00:00.000000Z",
                body.decode(),
                prev,
                sig,
            )
        )
    if n > 1:
        assert jcs.dumps(json.loads(rows[1][8])) == rows[1][8].encode()
        assert leaf_hash(rows[-1][8].encode()) == hashes[-1]
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO ledger_entry (seq, idempotency_key, actor, action, job, round, site, "
            "recorded, body, entry_hash, signature) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        conn.execute(
            "INSERT INTO ledger_actor VALUES (?,?,?)",
            ("site-bench", site.public_key.hex(), site.key_id.hex()),
        )
        root = merkle.root(hashes)
        signed_note = note.sign_note(
            note.format_checkpoint(note.Checkpoint(origin=ORIGIN, size=n, root_hash=root)), log
        )
        conn.execute(
            "INSERT INTO ledger_checkpoint VALUES (?,?,?,?,?)",
            (n, root.hex(), signed_note, "2026-01-01T00:00:00Z", "[]"),
        )
        conn.execute("INSERT INTO ledger_log VALUES (?,?)", (ORIGIN, note.format_vkey(log)))
    conn.close()
    return note.format_vkey(log)


def _num(x: float) -> str:
    return jcs.dumps(x).decode()


def _fill(tmpl: str, *, seq: int, r: int, prev: str) -> str:
    # the %-slots in canonical (sorted-key) order: idempotency_key's round, prev,
    # privacy.epsilon_cumulative, round, seq
    return tmpl % (r, prev, _num(0.4 * (r + 2)), r, seq)


def verify_seconds(path: Path, n: int, *, signed: bool) -> float:
    vkey = synthesize(path, n, signed=signed)
    start = time.perf_counter()
    report = verify_ledger(f"sqlite:///{path}", vkey=vkey, signatures=signed)
    seconds = time.perf_counter() - start
    assert report.entries == n and report.checkpoint_size == n
    return seconds


def proof_ratio(n: int, samples: int = 1000) -> float:
    rng = random.Random(0)
    ideal = 32 * math.ceil(math.log2(n))
    return sum(proof_bytes(n, rng.randrange(n)) for _ in range(samples)) / samples / ideal
