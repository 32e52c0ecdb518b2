"""The federation file: valid files resolve; each kind of bad file names its field."""

import re
from pathlib import Path

import pytest
from fedhelp import TABULAR_HEADER

from flows.demo import demo_config_text
from tasks.config import ConfigError, load_config, plan_digest, plan_from_dict
from tasks.synthetic import TABULAR_SCHEMA_TOML, tabular_schema

KEYS = {n: (f"{i:x}" * 64, f"{i + 5:x}" * 64) for i, n in enumerate(["site-a", "site-b"], 1)}
SITES = "".join(
    f'\n[[sites]]\nname = "{n}"\nkind = "dicom"\npublic_key = "{pk}"\nkex_key = "{kx}"\n'
    for n, (pk, kx) in KEYS.items()
)
GOOD = demo_config_text(rounds=2, dp=True) + SITES


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    return path


def test_demo_config_is_valid_and_paths_resolve_against_the_file(tmp_path):
    fed = load_config(write(tmp_path, GOOD))
    assert [s.name for s in fed.sites] == ["site-a", "site-b"]
    assert fed.keyholder == "site-a"  # the first site, unless [secure_aggregation] names one
    assert fed.ledger_url == f"sqlite:///{tmp_path.resolve()}/ledger.db"
    assert fed.artifact_store == (tmp_path.resolve() / "artifacts").as_uri()
    assert fed.dp.target_epsilon == 2.0 and fed.dp.noise_multiplier is None


def test_the_plan_names_keys_not_paths_and_its_digest_pins_every_setting(tmp_path):
    fed = load_config(write(tmp_path, GOOD))
    plan = fed.plan()
    assert "coordinator_root" not in plan and "site_timeout_seconds" not in plan
    assert plan["sites"][0]["public_key"] == KEYS["site-a"][0]
    assert plan["secure_aggregation"]["keyholder"] == "site-a"
    assert plan["secure_aggregation"]["scheme"] == "masked-bfv"
    other = load_config(
        write(tmp_path, GOOD.replace("learning_rate = 0.25", "learning_rate = 0.3"))
    )
    assert plan_digest(other.plan()) != plan_digest(plan)
    # The coordinator's own timeout is not part of what sites approve.
    same = load_config(
        write(tmp_path, GOOD.replace("site_timeout_seconds = 900.0", "site_timeout_seconds = 60"))
    )
    assert plan_digest(same.plan()) == plan_digest(plan)


def test_sites_must_not_share_keys_and_min_sites_is_checked_before_a_job(tmp_path):
    shared = GOOD.replace(KEYS["site-b"][0], KEYS["site-a"][0])
    with pytest.raises(ConfigError, match="share"):
        load_config(write(tmp_path, shared))
    fed = load_config(write(tmp_path, GOOD.replace("min_sites = 2", "min_sites = 5")))
    with pytest.raises(ConfigError, match="min_sites"):
        fed.check_runnable()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda t: t.replace("rounds = 2", "rounds = 0"), "rounds"),
        (lambda t: re.sub(r"learning_rate = .*", 'learning_rate = "fast"', t), "learning_rate"),
        (lambda t: t.replace("rounds = 2", "rounds = 2\nbatchsize = 4"), "batchsize"),
        (lambda t: t.replace('kind = "dicom"', 'kind = "xray"', 1), "sites.0.kind"),
        (lambda t: t.replace(KEYS["site-b"][0], "abc"), "sites.1.public_key"),
        (lambda t: t.replace('name = "site-a"', 'name = "site-a"\ndata = "x"'), "sites.0.data"),
        (
            lambda t: t.replace(
                'scheme = "masked-bfv"', 'scheme = "masked-bfv"\nkeyholder = "nobody"'
            ),
            "secure_aggregation.keyholder",
        ),
        (
            lambda t: t.replace('scheme = "masked-bfv"', 'scheme = "rot13"'),
            "secure_aggregation.scheme",
        ),
        (
            lambda t: t.replace("plain_modulus = 1073153", "plain_modulus = 1073154"),
            "plain_modulus",
        ),
        (
            lambda t: t.replace("quantization_bits = 18", "quantization_bits = 20"),
            "quantization_bits",
        ),
        (
            lambda t: t.replace(
                "target_epsilon = 2.0", "target_epsilon = 2.0\nnoise_multiplier = 1.0"
            ),
            "dp",
        ),
        (lambda t: t.replace("delta = 1e-5", "delta = 2"), "dp.delta"),
        (
            lambda t: t.replace("poly_modulus_degree = 4096", "poly_modulus_degree = 5000"),
            "secure_aggregation.bfv.poly_modulus_degree",
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


# --- a tabular federation's declared feature schema -------------------------------------------

TABULAR_SITES = SITES.replace('kind = "dicom"', 'kind = "tabular"')
TABULAR = TABULAR_HEADER + TABULAR_SITES


def test_tabular_schema_is_part_of_the_plan_and_its_digest(tmp_path):
    fed = load_config(write(tmp_path, TABULAR))
    assert [f.name for f in fed.features] == [f.name for f in tabular_schema()]
    plan = fed.plan()
    assert plan["features"][0] == {
        "name": "age",
        "type": "numeric",
        "min": 18.0,
        "max": 100.0,
        "fill": None,
        "missing": "error",
    }
    assert plan_from_dict(plan).features == fed.features  # a site reads the same schema back
    for old, new in [("max = 100", "max = 101"), ('"female"]', '"female", "diverse"]')]:
        other = load_config(write(tmp_path, TABULAR.replace(old, new, 1)))
        assert plan_digest(other.plan()) != plan_digest(plan)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (TABULAR_HEADER.split("\n[[features]]")[0] + TABULAR_SITES, "[[features]]"),
        (GOOD.replace("[[sites]]", TABULAR_SCHEMA_TOML + "\n[[sites]]", 1), "[[features]]"),
        (
            TABULAR.replace("max = 100", "max = 10"),
            "'features.0.numeric': feature 'age' needs min < max",
        ),
        (TABULAR.replace('name = "bmi"', 'name = "age"'), "feature names must be unique"),
        (TABULAR.replace('type = "boolean"', 'type = "flag"'), "features.8"),
        (TABULAR.replace('name = "bmi"', 'name = "sex_missing"'), "same model-input column"),
        (TABULAR.replace("max = 350", "max = inf"), "features.6.numeric.max"),
        (TABULAR.replace('categories = ["male", "female"]', "categories = []"), "features.1"),
    ],
)
def test_bad_feature_schema_is_one_sentence_naming_features(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert fragment in message and "features" in message
    assert "\n" not in message
