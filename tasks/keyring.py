"""The coordinator's root: its own keys, the CKKS *public* context, and per-job state.

```
COORDINATOR_ROOT/
  keys/identity.pem    Ed25519: signs instructions, aggregates and its ledger entries (0600)
  keys/log.pem         Ed25519: signs the ledger's C2SP checkpoints (0600)
  keys/ckks.public     the CKKS public context received from the key-holding site
  jobs/<job>/...       references the coordinator needs to resume a job (public material)
```

Nothing here can decrypt an update or the global model, and no site secret is ever here:
sites create their keys at the site (`tasks.site`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import keys
from tasks import StepError

COORDINATOR = "coordinator"
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
    def ckks_public(self) -> Path:
        return self.root / "keys" / "ckks.public"

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
