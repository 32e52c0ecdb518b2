"""medfed's audit ledger: hash-chained, signed entries in an RFC 6962 Merkle log.

`ledger` imports nothing from `tasks` or `flows`; its maths modules are pure.
"""


class LedgerError(Exception):
    """Root of every error the ledger raises."""


class VerificationError(LedgerError):
    """A signature, hash, proof or checkpoint does not verify."""


__all__ = ["LedgerError", "VerificationError"]
