"""`medfed demo --compare`: centralized, centralized + DP, federated, federated + DP on the
demo, as every federated-learning paper reports them (the session's demo run)."""

from __future__ import annotations

import json

import pytest

from ledger.store import Ledger
from tasks.config import load_config


def test_the_demo_compares_four_settings_and_dp_federation_keeps_the_centralized_auc(
    demo_workdir,
):
    doc = json.loads((demo_workdir / "compare.json").read_text())
    columns = doc["columns"]
    assert list(columns) == ["centralized", "centralized + DP", "federated", "federated + DP"]
    fed = load_config(demo_workdir / "federation.toml")
    names = {s.name for s in fed.sites}
    for name, column in columns.items():
        assert set(column["sites"]) == names, name
        assert 0.5 < column["auc"] <= 1.0, name
        # Every column is measured on the same held-out patients of each site.
        assert column["heldout"] == columns["centralized"]["heldout"], name
    # The same mechanism per patient: the plan's noise over the planned steps, so the pooled
    # DP run spends what each site spends, within the demo's target of 2.
    dp_eps = columns["federated + DP"]["epsilon"]
    assert dp_eps == pytest.approx(columns["centralized + DP"]["epsilon"], rel=1e-9)
    assert 1.9 < dp_eps <= fed.dp.target_epsilon
    assert columns["centralized"]["epsilon"] is None and columns["federated"]["epsilon"] is None
    assert columns["centralized"]["epochs"] == fed.rounds * fed.local_epochs
    # Issue 15's bar: federated + DP at the demo's epsilon keeps 95% of the pooled AUC.
    ratio = doc["federated_dp_over_centralized_auc"]
    assert ratio == pytest.approx(columns["federated + DP"]["auc"] / columns["centralized"]["auc"])
    assert ratio >= 0.95
    # The non-DP federation ran in its own folder and ledger; its sites released non-DP
    # updates, and the ledger says so (their epsilon is unbounded).
    plain = load_config(demo_workdir / "no-dp" / "federation.toml")
    assert not plain.dp.enabled
    trains = Ledger(plain.ledger_url, roster=plain.roster()).events(action="train")
    assert len(trains) == 2 * len(plain.sites)
    assert all(e["privacy"]["epsilon"] == "unbounded" for e in trains)
