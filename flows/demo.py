"""`medfed demo`: three synthetic DICOM hospitals, each set up as its own site root, and the
federation file that trains on them.

What a consortium does by hand, the demo does in order: each hospital runs `site init` in its
own root (keys created there), the coordinator registers each enrollment file (a ledger entry)
and writes the federation file with the sites' public keys only, and each site approves the
resulting training plan by its digest.
"""

from __future__ import annotations

from pathlib import Path

from ledger.store import Ledger
from tasks.config import FederationConfig, SiteKind, load_config
from tasks.coordinator_steps import (
    record_enrollment,
    site_entry_from_enrollment,
    site_entry_toml,
)
from tasks.keyring import (
    CoordinatorPaths,
    coordinator_identity,
    identities_toml,
    with_identities,
)
from tasks.site import (
    ENROLLMENT_FILE,
    SITE_FILE,
    Site,
    approve_plan,
    init_site,
    load_site,
    site_toml_text,
)
from tasks.synthetic import ensure_demo_cohorts

DEMO_SEED = 7

# Tuned on this 2-core machine (scratch simulations over eight cohort seeds, then the real
# demo): patient-level DP-SGD calibrated to epsilon 2 over the planned rounds, a small
# per-patient clip, a 64-unit head and 20 local epochs. Without DP the same settings
# memorise the mislabelled patients, which `medfed audit-privacy` shows; with DP they do not.
_TEMPLATE = """\
# medfed demo federation: written by `medfed demo`; edit and run with `medfed run`.
# Sites are named with their public keys only; their data and secrets stay in their roots.
name = "demo"
rounds = {rounds}
local_epochs = {epochs}
batch_size = 16
learning_rate = 0.25
holdout_fraction = 0.25
min_sites = 2
seed = {seed}
ledger_url = "{ledger_url}"
artifact_store = "{store}"
coordinator_root = "coordinator"
site_timeout_seconds = {timeout}

{model}

[dp]
enabled = {dp}
target_epsilon = 2.0
sample_rate = 0.06
max_grad_norm = 0.3
delta = 1e-5
epsilon_budget = {budget}
accountant = "prv"
update_clip_norm = 10.0

[images]
# The demo's CTs: tissue at 30-65 HU, lesions 40-80 HU brighter. A narrow, fixed window
# (like a liver window) keeps that contrast; every site applies the same one. Wider windows
# learn as well with DP but hide what DP buys: the non-DP model's memorisation (pooled attack
# AUC 0.50 at 40/400, 0.54-0.60 at 60/160, 0.59-0.60 at 60/120).
windows = {{ CT = {{ center = 60.0, width = 120.0 }} }}

[secure_aggregation]
# Pairwise-masked updates under BFV: no site, not even with the coordinator, reads another's.
scheme = "masked-bfv"

[secure_aggregation.bfv]
poly_modulus_degree = 4096
coeff_mod_bit_sizes = [36, 36]
plain_modulus = 1073153
quantization_bits = 18
"""


DEMO_MODEL = """[model]
kind = "cnn"
image_size = 32
hidden = 64"""


def model_section(network: str | None) -> str:
    """The demo's scatter-net head, or a MONAI network from the seed at the same image size."""
    if network is None:
        return DEMO_MODEL
    return f'[model]\nkind = "monai"\nnetwork = "{network}"\nimage_size = 32'


def demo_config_text(
    *,
    rounds: int,
    dp: bool,
    network: str | None = None,
    seed: int = DEMO_SEED,
    epsilon_budget: float = 2.0,
    local_epochs: int = 20,
    ledger_url: str = "sqlite:///ledger.db",
    store: str = "artifacts",
    timeout: float = 900.0,
) -> str:
    """The federation file without its [[sites]]: `medfed register` appends those."""
    return _TEMPLATE.format(
        model=model_section(network),
        rounds=rounds,
        dp=str(dp).lower(),
        seed=seed,
        budget=epsilon_budget,
        epochs=local_epochs,
        ledger_url=ledger_url,
        store=store,
        timeout=timeout,
    )


def demo_site(
    root: Path,
    name: str,
    data: Path,
    *,
    coordinator_key: str,
    budget: float,
    dp: bool = True,
    pseudonym_secret: bytes | None = None,
) -> Site:
    """A hospital's site root over its data folder (created once, reused after). The demo's
    baseline without DP needs the hospitals' opt-out: a site releases a non-DP update only
    when its own policy allows it (recorded; its epsilon is unbounded from then on)."""
    if (root / SITE_FILE).exists():
        if not dp:
            path = root / SITE_FILE
            path.write_text(path.read_text().replace("allow_non_dp = false", "allow_non_dp = true"))
        return load_site(root)
    if pseudonym_secret is not None:  # the same hospital's second root: the same patients
        from ledger import keys

        keys.write_secret(root / "keys" / "pseudonym.key", pseudonym_secret)
    return init_site(
        root,
        settings_text=site_toml_text(
            name=name,
            kind=SiteKind.DICOM,
            data=str(data),
            labels=str(data / "manifest.csv"),
            federation="demo",
            coordinator_key=coordinator_key,
            model_kinds=["cnn", "monai"],
            purposes=["HRESCH"],
            epsilon_budget=budget,
            delta=1e-5,
            # 56-94 held-out patients per demo site: noisy metrics (the default) would move
            # AUC by +-0.1-0.2 at the default noise; the demo's sites choose exact metrics,
            # which the ledger and `medfed ledger spend` show.
            metrics="exact",
            allow_non_dp=not dp,
        ),
    )


def assemble_federation(
    config: Path, header: str, sites: list[Site], *, register: bool = True
) -> FederationConfig:
    """Write header + one [[sites]] block per enrollment + the coordinator's [identities];
    register each site on the ledger; have every site approve the plan. Returns the loaded
    federation."""
    entries = [site_entry_from_enrollment(s.root / ENROLLMENT_FILE) for s in sites]
    text = header + "".join(site_entry_toml(e) for e in entries)
    config.write_text(text, encoding="utf-8")
    paths = CoordinatorPaths(root=load_config(config).coordinator_root)
    config.write_text(with_identities(text, identities_toml(paths)), encoding="utf-8")
    fed = load_config(config)
    if register:
        identity = coordinator_identity(paths)
        ledger = Ledger(fed.ledger_url, roster=fed.roster())
        for e in entries:
            record_enrollment(ledger, identity, e, fed.name)
    plan = fed.plan()
    for s in sites:
        approve_plan(s, plan)
    return fed


def prepare_demo(
    workdir: Path,
    *,
    rounds: int,
    dp: bool,
    epsilon_budget: float = 2.0,
    local_epochs: int = 20,
    site_budget: float = 10.0,
    cohorts: Path | None = None,
    network: str | None = None,
    same_split_as: Path | None = None,
    **header: object,
) -> Path:
    """Cohorts (generated when absent), site roots, coordinator keys, `workdir/federation.toml`.

    `same_split_as`: another demo's workdir whose sites' pseudonymization secrets the new site
    roots take, so each site holds out the same patients in both (`demo --compare`)."""
    workdir = Path(workdir).resolve()
    data = Path(cohorts) if cohorts else workdir / "data"
    found = ensure_demo_cohorts(data, seed=DEMO_SEED)
    coordinator = coordinator_identity(CoordinatorPaths(root=workdir / "coordinator"))
    sites = [
        demo_site(
            workdir / "sites" / name,
            name,
            found[name],
            coordinator_key=coordinator.public_key.hex(),
            budget=site_budget,
            dp=dp,
            pseudonym_secret=load_site(same_split_as / "sites" / name).pseudonym_secret()
            if same_split_as
            else None,
        )
        for name in sorted(found)
    ]
    config = workdir / "federation.toml"
    if network is not None:  # a MONAI network trains for minutes per round on a CPU
        header.setdefault("timeout", 3600.0)
    text = demo_config_text(
        rounds=rounds,
        dp=dp,
        network=network,
        epsilon_budget=epsilon_budget,
        local_epochs=local_epochs,
        **header,
    )
    assemble_federation(config, text, sites)
    return config
