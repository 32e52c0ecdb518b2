"""The federation file: valid files resolve; each kind of bad file names its field."""

import re
from pathlib import Path

import pytest

from flows.demo import demo_config_text
from tasks.config import ConfigError, load_config

GOOD = demo_config_text(["site-a", "site-b"], rounds=2, dp=True)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    return path


def test_demo_config_is_valid_and_paths_resolve_against_the_file(tmp_path):
    fed = load_config(write(tmp_path, GOOD))
    assert [s.name for s in fed.sites] == ["site-a", "site-b"]
    assert fed.sites[0].data == tmp_path.resolve() / "data" / "site-a"
    assert fed.ledger_url == f"sqlite:///{tmp_path.resolve()}/ledger.db"
    assert fed.artifact_store == (tmp_path.resolve() / "artifacts").as_uri()
    assert fed.dp.target_epsilon == 2.0 and fed.dp.noise_multiplier is None


def test_a_site_policy_overrides_the_federation_dp_for_that_site_only(tmp_path):
    text = GOOD.replace('name = "site-b"', 'name = "site-b"\nepsilon_budget = 0.5\ndelta = 1e-7')
    fed = load_config(write(tmp_path, text))
    own, other = fed.dp_for("site-b"), fed.dp_for("site-a")
    assert (own.epsilon_budget, own.delta) == (0.5, 1e-7)
    assert (other.epsilon_budget, other.delta) == (fed.dp.epsilon_budget, fed.dp.delta) == (2, 1e-5)
    assert own.target_epsilon == other.target_epsilon == 2.0
    with pytest.raises(ConfigError, match="site-c"):
        fed.dp_for("site-c")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda t: t.replace("rounds = 2", "rounds = 0"), "rounds"),
        (lambda t: re.sub(r"learning_rate = .*", 'learning_rate = "fast"', t), "learning_rate"),
        (lambda t: t.replace("rounds = 2", "rounds = 2\nbatchsize = 4"), "batchsize"),
        (lambda t: t.replace('kind = "dicom"', 'kind = "xray"', 1), "sites.0.kind"),
        (lambda t: t.replace("min_sites = 2", "min_sites = 5"), "min_sites"),
        (
            lambda t: t.replace('name = "site-b"', 'name = "site-b"\nepsilon_budget = -1'),
            "sites.1.epsilon_budget",
        ),
        (lambda t: t.replace('name = "site-a"', 'name = "site-a"\ndelta = 1.5'), "sites.0.delta"),
        (
            lambda t: t.replace(
                "target_epsilon = 2.0", "target_epsilon = 2.0\nnoise_multiplier = 1.0"
            ),
            "dp",
        ),
        (lambda t: t.replace("delta = 1e-5", "delta = 2"), "dp.delta"),
        (
            lambda t: t.replace("poly_modulus_degree = 8192", "poly_modulus_degree = 5000"),
            "ckks.poly_modulus_degree",
        ),
        (lambda t: t.replace('name = "site-b"', 'name = "site-a"'), "site names must be unique"),
        (lambda t: t.replace('name = "site-b"', 'name = "Site B!"'), "sites.1.name"),
        (lambda t: t.replace('kind = "cnn"', 'kind = "mlp"'), "model.kind"),
        (lambda t: t.replace("hidden = 64", "hidden = -1"), "model.hidden"),
        (
            lambda t: t.replace('kind = "cnn"', 'kind = "mlp"').replace(
                "hidden = 64", "hidden = 0"
            ),
            "model.hidden",
        ),
        (lambda t: t.split("[[sites]]")[0], "sites"),
    ],
)
def test_bad_config_names_the_field(tmp_path, edit, field):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, edit(GOOD)))
    message = str(info.value)
    assert field in message
    assert "\n" not in message  # one sentence, not a pydantic dump


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "rounds = = 3"))


def test_tabular_federation(tmp_path):
    text = """
name = "ehr"
[model]
kind = "logistic"
[[sites]]
name = "a"
kind = "tabular"
data = "a.csv"
labels = "outcome"
[[sites]]
name = "b"
kind = "tabular"
data = "b.db"
table = "visits"
labels = "outcome"
"""
    fed = load_config(write(tmp_path, text))
    assert fed.sites[1].table == "visits"
    assert fed.sites[0].labels == "outcome"  # a column, not resolved as a path
