"""The coordinator's root: its own keys, the CKKS *public* context, and per-job state.

```
COORDINATOR_ROOT/
  keys/identity.pem    Ed25519: signs instructions, aggregates and its ledger entries (0600)
  keys/log.pem         Ed25519: signs the ledger's C2SP checkpoints (0600)
  keys/he.public       the secure-aggregation public context received from the key-holding site
  log/<ledger>.checkpoint  the checkpoint the log key signed last, kept outside the database:
                       the coordinator never signs a log that does not extend it
  jobs/<job>/...       references the coordinator needs to resume a job (public material)
```

Nothing here can decrypt an update or the global model, and no site secret is ever here:
sites create their keys at the site (`tasks.site`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import keys, note
from ledger.identities import COORDINATOR
from tasks import StepError

LOG_KEY_NAME = "medfed-log"


@dataclass(frozen=True, kw_only=True)
class CoordinatorPaths:
    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "keys" / "identity.pem"

    @property
    def log_key(self) -> Path:
        """The ledger log's key: signs the C2SP checkpoint published at every round commit."""
        return self.root / "keys" / "log.pem"

    @property
    def he_public(self) -> Path:
        return self.root / "keys" / "he.public"

    def last_checkpoint(self, ledger_url: str) -> Path:
        """The checkpoint the log key signed last for the ledger at `ledger_url`."""
        digest = hashlib.sha256(ledger_url.encode()).hexdigest()[:16]
        return self.root / "log" / f"{digest}.checkpoint"

    def job_state(self, job: str, name: str) -> Path:
        return self.root / "jobs" / job / f"{name}.json"

    def save_state(self, job: str, name: str, state: dict[str, Any]) -> None:
        keys.write_secret(self.job_state(job, name), json.dumps(state, sort_keys=True).encode())

    def load_state(self, job: str, name: str) -> dict[str, Any] | None:
        path = self.job_state(job, name)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StepError(f"coordinator state {path} is unreadable") from exc


def coordinator_identity(paths: CoordinatorPaths) -> keys.Identity:
    return keys.load_or_create(COORDINATOR, paths.identity)


def log_identity(paths: CoordinatorPaths) -> keys.Identity:
    return keys.load_or_create(LOG_KEY_NAME, paths.log_key)


def identities_toml(paths: CoordinatorPaths, *, dpo: str | None = None) -> str:
    """The federation file's `[identities]` table: the coordinator's and the log's public
    keys (created on first use), and the DPO's when given (64 hex digits)."""
    lines = [
        "[identities]  # who may write what on the ledger; sites approve it with the plan",
        f'coordinator = "{coordinator_identity(paths).public_key.hex()}"',
        f'log = "{note.format_vkey(log_identity(paths))}"',
    ]
    if dpo:
        lines.append(f'dpo = "{dpo}"')
    return "\n".join(lines) + "\n"


_IDENTITIES = re.compile(r"^\[identities\][^\n]*\n(?:(?!\[)[^\n]*\n)*", re.MULTILINE)


def with_identities(text: str, block: str) -> str:
    """`text` (a federation file) with its `[identities]` table replaced by `block`, or with
    `block` appended when it has none."""
    if _IDENTITIES.search(text):
        return _IDENTITIES.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block
