"""The ledger trusts only enrolled identities and its own signed past (issue 10), on SQLite and
PostgreSQL: every attack the review reproduced, done here to a real ledger, is caught.

- Anyone can join: an unenrolled actor ("mallory") registers its own key and appends validly
  signed refuse / commit / disclose / preprocess entries.
- Truncation: a suffix of the log and the checkpoints above it are deleted.
- Re-signing: every entry re-signed by attacker keys, the checkpoints deleted.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import text

from ledger import LedgerError, VerificationError, keys, note, queries, witness
from ledger.entry import Action, Event, Outcome
from ledger.identities import Judgement, Roster, roster_from_mapping
from ledger.store import Ledger
from ledger.verify import CheckpointError, EntryError, verify_bundle, verify_ledger, write_bundle

COORD = keys.generate("coordinator")
SITE_A = keys.generate("site-a")
SITE_B = keys.generate("site-b")
DPO = keys.generate("dpo")
LOG = keys.generate("medfed-log")
MALLORY = keys.generate("mallory")
ORIGIN = "medfed.local/trust"
VKEY = note.format_vkey(LOG)


def roster(*, log: bool = True) -> Roster:
    return roster_from_mapping(
        {
            "identities": {
                "coordinator": COORD.public_key.hex(),
                "dpo": DPO.public_key.hex(),
                **({"log": VKEY} if log else {}),
            },
            "sites": [
                {"name": "site-a", "public_key": SITE_A.public_key.hex()},
                {"name": "site-b", "public_key": SITE_B.public_key.hex()},
            ],
        }
    )


def ev(actor, action, key, **kw) -> Event:
    return Event(
        actor=actor.name, action=action, job=kw.pop("job", "job-1"), idempotency_key=key, **kw
    )


def site_round(ledger: Ledger, r: int) -> None:
    for site in (SITE_A, SITE_B):
        ledger.append(
            ev(
                site,
                Action.TRAIN,
                f"job-1/r{r}/{site.name}/train",
                round=r,
                site=site.name,
                inputs={"dataset": "da" * 32},
                privacy={"release": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}},
            ),
            site,
        )
        ledger.append(
            ev(
                site,
                Action.UPLOAD,
                f"job-1/r{r}/{site.name}/upload",
                round=r,
                site=site.name,
                outputs={"artifact": f"{r:02x}" * 32},
                recipient="coordinator",
            ),
            site,
        )
    ledger.append(
        ev(
            COORD,
            Action.COMMIT_ROUND,
            f"job-1/r{r}/coordinator/commit_round",
            round=r,
            outputs={"global_model": f"{r:02x}" * 32},
            details={"participants": ["site-a", "site-b"]},
        ),
        COORD,
    )


class Federation:
    """A ledger written by the enrolled parties, checkpointed by the coordinator at each
    commit (keeping its last checkpoint apart) and cosigned by both sites (each keeping its
    cosigned checkpoint in its own 'root', here a dict)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ledger = Ledger(url, roster=roster())
        self.coordinator_kept: str | None = None
        self.kept: dict[str, str | None] = {"site-a": None, "site-b": None}
        self.checkpoints: list[int] = []
        for site in (SITE_A, SITE_B):
            self.ledger.append(
                ev(
                    COORD,
                    Action.ENROLL,
                    f"trust/enroll/{site.name}",
                    site=site.name,
                    details={
                        "role": "site",
                        "site": site.name,
                        "public_key": site.public_key.hex(),
                    },
                ),
                COORD,
            )

    def commit(self, r: int) -> None:
        site_round(self.ledger, r)
        self.coordinator_kept = self.ledger.checkpoint(
            LOG, ORIGIN, last_signed=self.coordinator_kept
        )
        self.checkpoints.append(
            note.parse_checkpoint(self.coordinator_kept.split("\n\n")[0] + "\n").size
        )
        for site in (SITE_A, SITE_B):
            done = witness.cosign_newest(
                self.ledger,
                site,
                vkey=VKEY,
                origin=ORIGIN,
                kept=self.kept[site.name],
                timestamp=1_700_000_000 + r,
            )
            assert done is not None
            self.kept[site.name] = done.note


@pytest.fixture
def fed(url) -> Federation:
    f = Federation(url)
    for r in (1, 2, 3):
        f.commit(r)
    return f


def execute(url: str, sql: str, **params) -> None:
    with Ledger(url).engine.begin() as conn:
        conn.execute(text(sql), params)


# ---------------------------------------------------------------- anyone can join


def test_an_unenrolled_actor_fails_verification_and_is_ignored_by_flows_and_queries(fed):
    url = fed.url
    assert verify_ledger(url, roster=roster(), witnesses=2).witnesses == ("site-a", "site-b")
    # Mallory writes with the ledger's own API (self-registered key, valid signatures),
    # squatting on the keys of steps the sites and the coordinator have not written yet.
    attacker = Ledger(url)
    attacker.append(
        ev(
            MALLORY,
            Action.REFUSE,
            "job-1/r4/site-a/train",
            round=4,
            site="site-a",
            outcome=Outcome.REFUSED,
            details={"reason": "budget"},
        ),
        MALLORY,
    )
    attacker.append(
        ev(
            MALLORY,
            Action.COMMIT_ROUND,
            "job-1/r4/coordinator/commit_round",
            round=4,
            outputs={"global_model": "ff" * 32},
        ),
        MALLORY,
    )
    attacker.append(
        ev(MALLORY, Action.DISCLOSE, "m/disclose", site="site-a", recipient="mallory corp"),
        MALLORY,
    )
    attacker.append(
        ev(MALLORY, Action.PREPROCESS, "m/pre", site="site-b", outputs={"dataset": "66" * 32}),
        MALLORY,
    )
    first = verify_ledger(url).entries - 5  # its register_key entry, then its four entries

    with pytest.raises(EntryError) as info:
        verify_ledger(url, roster=roster())
    assert info.value.seq == first and "'mallory' is not an enrolled identity" in str(info.value)

    assert not Ledger(url, roster=roster()).events(actor="mallory")
    trusted = Ledger(url, roster=roster())
    assert not trusted.events(job="job-1", round=4)  # neither the refusal nor the commit
    assert trusted.ignored == {"mallory": 2}
    rows = queries.disclosures(trusted)
    assert rows and all(r["recipient"] != "mallory corp" for r in rows)
    assert all(r["dataset"] != "66" * 32 for r in queries.data_use(trusted))
    with pytest.raises(LedgerError, match="no committed round"):
        queries.lineage(trusted, "ff")
    # The site and the coordinator still write their own steps under those keys.
    assert trusted.append(
        ev(SITE_A, Action.TRAIN, "job-1/r4/site-a/train", round=4, site="site-a"), SITE_A
    ).created
    assert trusted.append(
        ev(COORD, Action.COMMIT_ROUND, "job-1/r4/coordinator/commit_round", round=4), COORD
    ).created
    assert [e["actor"] for e in trusted.events(job="job-1", round=4)] == ["site-a", "coordinator"]


@pytest.mark.parametrize(
    ("signer", "event", "why"),
    [
        (SITE_A, dict(action=Action.COMMIT_ROUND, round=1), "may not write 'commit_round'"),
        (SITE_A, dict(action=Action.TRAIN, site="site-b"), "about site 'site-b'"),
        (SITE_A, dict(action=Action.JOB_START), "may not write 'job_start'"),
        (COORD, dict(action=Action.ERASE), "may not write 'erase'"),
        (COORD, dict(action=Action.TRAIN, site="site-a"), "may not write 'train'"),
        (DPO, dict(action=Action.SECURE_AGGREGATE), "may not write 'secure_aggregate'"),
        # Only whoever runs the ledger API (coordinator or DPO) records a denied request:
        # a site cannot blame another role's token.
        (SITE_A, dict(action=Action.ACCESS_DENIED, site="site-a"), "may not write 'access_d"),
    ],
)
def test_an_enrolled_actor_writes_only_within_its_role(url, signer, event, why):
    with pytest.raises(LedgerError, match=why):
        Ledger(url, roster=roster()).append(ev(signer, key="k", **event), signer)
    Ledger(url).append(ev(signer, key="k", **event), signer)  # a writer that checks nothing
    with pytest.raises(EntryError, match=why):
        verify_ledger(url, roster=roster())
    assert not Ledger(url, roster=roster()).events(idempotency_key="k")


def test_an_entry_naming_an_enrolled_actor_that_it_did_not_sign_is_forgery(fed):
    (victim,) = fed.ledger.events(idempotency_key="job-1/r2/site-a/train")
    other = keys.generate("x").sign(b"not the body")
    import base64

    execute(
        fed.url,
        "UPDATE ledger_entry SET signature = :s WHERE seq = :q",
        s=base64.b64encode(other).decode(),
        q=victim["seq"],
    )
    with pytest.raises(VerificationError, match="tampered"):
        Ledger(fed.url, roster=roster()).events(site="site-a")
    with pytest.raises(EntryError) as info:
        verify_ledger(fed.url, roster=roster())
    assert info.value.seq == victim["seq"]
    body = json.dumps(victim)  # roster.judge on a body that is not the signed one
    assert roster().judge(victim, body.encode(), "AAAA").judgement == Judgement.FORGED


# ---------------------------------------------------------------- truncation


def _truncate(url: str, cut: int) -> None:
    execute(url, "DELETE FROM ledger_cosignature WHERE size > :c", c=cut)
    execute(url, "DELETE FROM ledger_checkpoint WHERE size > :c", c=cut)
    execute(url, "DELETE FROM ledger_payload WHERE seq >= :c", c=cut)
    execute(url, "DELETE FROM ledger_entry WHERE seq >= :c", c=cut)


@pytest.mark.parametrize("cut", ["last entry", "last 7", "at an older checkpoint", "all but 1"])
def test_truncating_any_suffix_is_refused_by_every_witness_and_by_verify(new_url, cut):
    fed = Federation(new_url())
    for r in (1, 2, 3):
        fed.commit(r)
    size = fed.ledger.size()
    at = {
        "last entry": size - 1,
        "last 7": size - 7,
        "at an older checkpoint": fed.checkpoints[0],
        "all but 1": 1,
    }[cut]
    _truncate(fed.url, at)
    # The next round: entries appended after the cut, as the attack's next job did.
    site_round(Ledger(fed.url, roster=roster()), 9)
    for site in ("site-a", "site-b"):
        with pytest.raises(witness.WitnessError):
            witness.check_log(fed.ledger, vkey=VKEY, origin=ORIGIN, kept=fed.kept[site])
        with pytest.raises(VerificationError):
            verify_ledger(fed.url, vkey=VKEY, pinned_checkpoints=[fed.kept[site]])
    # The coordinator's log key never signs a log that contradicts its last checkpoint.
    with pytest.raises(VerificationError, match="no longer extends"):
        fed.ledger.checkpoint(LOG, ORIGIN, last_signed=fed.coordinator_kept)


def test_a_witness_accepts_a_log_that_extends_what_it_cosigned(fed):
    site_round(fed.ledger, 4)  # appended after the last checkpoint: not yet covered
    for site in ("site-a", "site-b"):
        view = witness.check_log(fed.ledger, vkey=VKEY, origin=ORIGIN, kept=fed.kept[site])
        assert view.checkpoint.size == fed.checkpoints[-1] < view.entries
    fed.commit(5)
    assert verify_ledger(fed.url, roster=roster(), witnesses=2).entries == fed.ledger.size()


def test_a_rewritten_entry_under_a_kept_checkpoint_is_refused(fed):
    (victim,) = fed.ledger.events(idempotency_key="job-1/r1/site-a/train")
    execute(
        fed.url,
        "UPDATE ledger_entry SET body = replace(body, :old, :new) WHERE seq = :seq",
        old='"steps":10',
        new='"steps":1',
        seq=victim["seq"],
    )
    with pytest.raises(witness.WitnessError, match="rewritten"):
        witness.check_log(fed.ledger, vkey=VKEY, origin=ORIGIN, kept=fed.kept["site-a"])


# ---------------------------------------------------------------- checkpoints and witnesses


def test_a_pinned_log_key_needs_a_checkpoint_covering_the_whole_log(fed, new_url, tmp_path):
    # Re-signed by attacker keys under the same names, checkpoints deleted: the pinned key
    # vouches for nothing, so nothing verifies.
    forged_url = new_url()
    forged = Ledger(forged_url)
    attackers = {name: keys.generate(name) for name in ("coordinator", "site-a", "site-b")}
    for body in [e for e in Ledger(fed.url).events() if e["action"] != "register_key"]:
        actor = attackers[body["actor"]]
        forged.append(
            Event(
                actor=body["actor"],
                action=Action(body["action"]),
                job=body["job"],
                round=body["round"],
                site=body["site"],
                idempotency_key=body["idempotency_key"],
                details=body["details"],
            ),
            actor,
        )
    assert verify_ledger(forged_url).checkpoints == 0  # internally consistent
    with pytest.raises(VerificationError, match="no checkpoint signed by the pinned log key"):
        verify_ledger(forged_url, vkey=VKEY)
    bundle = tmp_path / "forged.json"
    write_bundle(Ledger(forged_url), bundle)
    with pytest.raises(VerificationError, match="no checkpoint signed by the pinned log key"):
        verify_bundle(bundle, vkey=VKEY)
    with pytest.raises(VerificationError):
        verify_ledger(forged_url, roster=roster())
    # The real ledger with an entry past its last checkpoint: not covered.
    site_round(fed.ledger, 4)
    with pytest.raises(VerificationError, match="not covered by a checkpoint"):
        verify_ledger(fed.url, vkey=VKEY)


def test_witness_cosignatures_are_counted_and_checked(fed, tmp_path):
    report = verify_ledger(fed.url, roster=roster(), witnesses=2)
    assert report.cosignatures == 2 * 3 and report.witnesses == ("site-a", "site-b")
    with pytest.raises(LedgerError, match="more than the 2 enrolled sites"):
        verify_ledger(fed.url, roster=roster(), witnesses=3)
    with pytest.raises(LedgerError, match="needs the enrolled witnesses"):
        verify_ledger(fed.url, witnesses=1)
    bundle = tmp_path / "b.json"
    write_bundle(fed.ledger, bundle)
    assert verify_bundle(bundle, roster=roster(), witnesses=2).witnesses == ("site-a", "site-b")

    # Only one site cosigns the newest checkpoint: --witnesses 2 fails, 1 passes.
    last = fed.checkpoints[-1]
    execute(
        fed.url, "DELETE FROM ledger_cosignature WHERE size = :s AND witness = 'site-b'", s=last
    )
    assert verify_ledger(fed.url, roster=roster(), witnesses=1).witnesses == ("site-a",)
    with pytest.raises(VerificationError, match="cosigned by 2 enrolled witnesses"):
        verify_ledger(fed.url, roster=roster(), witnesses=2)
    # ... but site-b's own kept checkpoint, handed to the verifier, carries its cosignature.
    assert verify_ledger(
        fed.url, roster=roster(), witnesses=2, pinned_checkpoints=[fed.kept["site-b"]]
    ).witnesses == ("site-a", "site-b")

    # A tampered cosignature, and one by somebody who is not an enrolled witness.
    line = fed.ledger.cosignatures()[0][2]
    flipped = line[:-6] + ("A" if line[-6] != "A" else "B") + line[-5:]
    execute(
        fed.url,
        "UPDATE ledger_cosignature SET line = :l WHERE size = :s AND witness = 'site-a'",
        l=flipped,
        s=fed.checkpoints[0],
    )
    with pytest.raises(CheckpointError, match="cosignature by 'site-a' does not verify"):
        verify_ledger(fed.url, roster=roster())
    execute(
        fed.url,
        "UPDATE ledger_cosignature SET line = :l, witness = 'mallory' WHERE size = :s "
        "AND witness = 'site-a'",
        l=line,
        s=fed.checkpoints[0],
    )
    with pytest.raises(CheckpointError, match="'mallory', who is not an enrolled witness"):
        verify_ledger(fed.url, roster=roster())


def test_a_tampered_actor_table_fails_verification(fed):
    execute(
        fed.url,
        "UPDATE ledger_actor SET public_key = :k WHERE name = 'site-a'",
        k=MALLORY.public_key.hex(),
    )
    with pytest.raises(VerificationError, match="actor table's key for 'site-a'"):
        verify_ledger(fed.url)
    with pytest.raises(LedgerError, match="actor table was altered"):
        Ledger(fed.url).append(ev(SITE_A, Action.TRAIN, "new", site="site-a"), SITE_A)


def test_verification_opens_the_database_read_only(fed):
    before = _digest(fed.url)
    verify_ledger(fed.url, roster=roster(), witnesses=2)
    queries.spend_summary(Ledger(fed.url, roster=roster()))
    assert _digest(fed.url) == before


def _digest(url: str) -> str:
    rows = []
    with Ledger(url).engine.connect() as conn:
        for table in ("ledger_entry", "ledger_checkpoint", "ledger_cosignature", "ledger_actor"):
            rows.append(conn.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2")).all())
    return hashlib.sha256(repr(rows).encode()).hexdigest()


# ---------------------------------------------------------------- enrolling the DPO


def test_only_the_enrolled_dpo_key_erases(tmp_path):
    from fedhelp import tabular_federation
    from typer.testing import CliRunner

    from flows.cli.main import app
    from tasks.config import load_config
    from tasks.synthetic import write_tabular_cohort

    a = write_tabular_cohort(tmp_path / "a.csv", n_patients=40, seed=1)
    b = write_tabular_cohort(tmp_path / "b.csv", n_patients=40, seed=2)
    config = tabular_federation(tmp_path, {"clinic-a": (a, None), "clinic-b": (b, None)})
    dpo_pem, impostor_pem = tmp_path / "dpo.pem", tmp_path / "other.pem"
    keys.save(DPO, dpo_pem)
    keys.save(keys.generate("dpo"), impostor_pem)
    run = CliRunner().invoke
    result = run(app, ["ledger", "vkey", "--key", str(dpo_pem), "--hex"])
    assert result.exit_code == 0 and result.stdout.strip() == DPO.public_key.hex()
    result = run(app, ["register", str(config), "--dpo", DPO.public_key.hex()])
    assert result.exit_code == 0, result.output
    fed = load_config(config)
    assert fed.identities.dpo == DPO.public_key.hex()
    Ledger(fed.ledger_url, roster=fed.roster()).append(
        Event(
            actor="clinic-a",
            action=Action.PREPROCESS,
            job="j",
            site="clinic-a",
            idempotency_key="j/pre",
            personal={"note": "asked by patient"},
            subject="subject-1",
        ),
        keys.load("clinic-a", tmp_path / "sites/clinic-a/keys/identity.pem"),
    )
    erase = ["ledger", "erase", "--ledger", fed.ledger_url, "--subject", "subject-1",
             "--identities", str(config), "--key"]  # fmt: skip
    refused = run(app, [*erase, str(impostor_pem)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "not signed with the key enrolled for 'dpo'" in said
    assert Ledger(fed.ledger_url).payloads()  # nothing erased
    done = run(app, [*erase, str(dpo_pem)])
    assert done.exit_code == 0, done.output
    assert not Ledger(fed.ledger_url).payloads()
    enrolled = Ledger(fed.ledger_url).events(action="enroll")
    assert any(e["details"].get("role") == "dpo" for e in enrolled)
