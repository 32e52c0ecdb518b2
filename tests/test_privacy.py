"""Privacy maths: accounting over histories, calibration, update clipping, noise."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import LedgerError
from ledger.accounting import Release, epsilon, merged
from tasks import StepError
from tasks.privacy import calibrate_noise, clip_update, gaussian_noise, planned_release

R = Release(noise_multiplier=1.0, sample_rate=0.1, steps=20)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_grows_with_history_and_merging_changes_nothing(accountant):
    one = epsilon([R], delta=1e-5, accountant=accountant)
    three = epsilon([R, R, R], delta=1e-5, accountant=accountant)
    as_one = epsilon(
        [Release(noise_multiplier=1.0, sample_rate=0.1, steps=60)],
        delta=1e-5,
        accountant=accountant,
    )
    assert 0 < one < three
    assert three == pytest.approx(as_one, rel=1e-9)
    assert epsilon([], delta=1e-5, accountant=accountant) == 0.0


def test_merge_keeps_distinct_mechanisms_apart():
    other = Release(noise_multiplier=2.0, sample_rate=0.1, steps=5)
    assert merged([R, other, R]) == {(1.0, 0.1): 40, (2.0, 0.1): 5}


def test_rdp_is_looser_than_prv():
    assert epsilon([R], delta=1e-5, accountant="rdp") > epsilon([R], delta=1e-5, accountant="prv")


def test_unknown_accountant_and_invalid_release():
    with pytest.raises(LedgerError, match="unknown accountant"):
        epsilon([R], delta=1e-5, accountant="gdp-ish")
    for bad in (
        {"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1},
        {"noise_multiplier": float("inf"), "sample_rate": 0.1, "steps": 1},
    ):
        with pytest.raises(LedgerError):
            Release(**bad)


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(min_value=0.5, max_value=8.0),
    q=st.floats(min_value=0.01, max_value=0.3),
    steps=st.integers(min_value=5, max_value=200),
)
def test_calibration_never_overshoots_the_target(target, q, steps):
    sigma = calibrate_noise(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
    )
    spent = epsilon(
        [Release(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=1e-5, accountant="rdp"
    )
    assert spent <= target * 1.0001


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_shares_the_target_with_site_level_noise(accountant):
    """Target-epsilon mode with site-level update noise: DP-SGD gets what the site-level
    releases leave, so the whole plan lands just under the target."""
    from tasks.privacy import site_level_release

    site = (site_level_release(20.0),) * 3
    q, steps, target = 0.05, 300, 2.0
    alone = calibrate_noise(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant
    )
    shared = calibrate_noise(
        target_epsilon=target,
        delta=1e-5,
        sample_rate=q,
        steps=steps,
        accountant=accountant,
        alongside=site,
    )
    assert shared > alone  # DP-SGD needs more noise when it shares the budget
    plan = [Release(noise_multiplier=shared, sample_rate=q, steps=steps), *site]
    assert target - 0.01 <= epsilon(plan, delta=1e-5, accountant=accountant) <= target
    with pytest.raises(StepError, match="site-level update noise alone"):
        calibrate_noise(
            target_epsilon=0.1,
            delta=1e-5,
            sample_rate=q,
            steps=steps,
            accountant=accountant,
            alongside=site,
        )


def test_planned_release_is_a_function_of_the_plan_alone():
    """ceil(1/q) Poisson steps per epoch at the plan's q: no cohort size enters, so
    neighbouring cohorts run the same mechanism (the add/remove bound describes it)."""
    r = planned_release(sample_rate=0.25, epochs=2, noise_multiplier=1.2)
    assert r == Release(noise_multiplier=1.2, sample_rate=0.25, steps=8)
    assert planned_release(sample_rate=0.3, epochs=1, noise_multiplier=1.0).steps == 4
    assert planned_release(sample_rate=1.0, epochs=3, noise_multiplier=1.0).steps == 3


@given(
    st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=1, max_size=50),
    st.floats(min_value=0.01, max_value=100),
)
def test_clip_bounds_the_norm_and_keeps_direction(values, bound):
    update = np.array(values, dtype=np.float32)
    clipped, norm = clip_update(update, max_norm=bound)
    assert np.linalg.norm(clipped) <= bound * (1 + 1e-5)
    if norm <= bound:
        np.testing.assert_allclose(clipped, update, rtol=1e-6)
    elif norm > 0:
        np.testing.assert_allclose(
            clipped * (norm / np.linalg.norm(clipped)), update, rtol=1e-3, atol=1e-3
        )


def test_clip_rejects_non_finite_updates():
    with pytest.raises(StepError, match="NaN"):
        clip_update(np.array([1.0, np.nan], dtype=np.float32), max_norm=1.0)


@pytest.mark.parametrize("secure", [False, True])
def test_gaussian_noise_has_the_requested_spread(secure):
    z = gaussian_noise(200_000, std=2.5, secure=secure, seed=1)
    assert abs(float(z.mean())) < 0.03
    assert float(z.std()) == pytest.approx(2.5, rel=0.02)


def test_seeded_noise_is_reproducible_and_secure_noise_is_not():
    np.testing.assert_array_equal(
        gaussian_noise(10, std=1, secure=False, seed=3),
        gaussian_noise(10, std=1, secure=False, seed=3),
    )
    assert not np.array_equal(
        gaussian_noise(10, std=1, secure=True), gaussian_noise(10, std=1, secure=True)
    )


def test_site_level_noise_is_accounted_at_half_the_multiplier():
    from tasks.privacy import site_level_release

    assert site_level_release(0.0) is None
    r = site_level_release(4.0)
    assert r == Release(noise_multiplier=2.0, sample_rate=1.0, steps=1)
    # More noise, less epsilon; and it composes with DP-SGD releases.
    assert epsilon([site_level_release(8.0)], delta=1e-5, accountant="rdp") < epsilon(
        [r], delta=1e-5, accountant="rdp"
    )
    assert epsilon([R, r], delta=1e-5, accountant="prv") > epsilon(
        [R], delta=1e-5, accountant="prv"
    )


def test_plan_projects_cumulative_epsilon_per_round():
    from tasks.privacy import plan

    projected = plan([R], [R], rounds=3, delta=1e-5, accountant="rdp")
    assert projected == sorted(projected) and len(projected) == 3
    assert projected[-1] == pytest.approx(epsilon([R] * 4, delta=1e-5, accountant="rdp"))
