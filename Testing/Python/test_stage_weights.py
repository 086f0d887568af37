"""Progress follows the measured stage costs: the sampling share grows with the preset's passes."""
import pytest

from msdseg.inference.stage_weights import stage_plan

pytestmark = pytest.mark.unit


def test_stages_are_ordered_and_the_sampling_share_follows_the_passes():
    fast = stage_plan(1, 2, refined=True, bf16=False)
    balanced = stage_plan(2, 8, refined=True, bf16=False)
    for plan in (fast, balanced):
        assert 0 < plan.sampling < plan.fit <= plan.backproject < 1
        assert plan.in_sampling(0) == plan.sampling and plan.in_sampling(1) == plan.fit
        assert plan.in_backprojection(1) == 1.0
    assert (balanced.fit - balanced.sampling) > (fast.fit - fast.sampling)
    # the stages around the network weigh more where the network is faster
    assert stage_plan(2, 8, True, bf16=True).fit < balanced.fit


def test_without_the_intensity_model_there_is_no_fit_stage():
    plan = stage_plan(1, 2, refined=False, bf16=False)
    assert plan.fit == plan.backproject
