"""Policies and the student's loss against numbers worked out by hand.

Self-paced weights (CuDFKD, DESIGN.md sections 4 and 9), the schedules that
drive alpha_adv(t) and lambda(t), and the per-sample student losses of
``dfkd/losses.py``. Every expected value is written out here, never produced
by the code under test.
"""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from dfkd.errors import ConfigError
from dfkd.losses import StudentLoss
from dfkd.policies.schedules import affine, build_schedule, constant, cosine, linear, multistep, piecewise
from dfkd.policies.weighting import SampleWeighting, build_weighting, spl_hard, spl_log, spl_soft

LOSSES = torch.tensor([0.0, 1.0, 2.0, 3.0])  # below, below, at and above lambda = 2
LAM = 2.0

# --------------------------------------------------------------------------------- self-paced rules


def test_hard_is_one_strictly_below_lambda():
    assert spl_hard(LOSSES, LAM).tolist() == [1.0, 1.0, 0.0, 0.0]  # l = lambda weighs 0: strict <


def test_soft_is_one_minus_l_over_lambda_below_and_zero_from_lambda_on():
    # 1 - 0/2 = 1, 1 - 1/2 = 0.5, then 0 at and above lambda (never negative)
    assert torch.allclose(spl_soft(LOSSES, LAM), torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert spl_soft(torch.tensor([100.0]), LAM).item() == 0.0


def test_log_on_known_values():
    # (1 + e^-2) / (1 + e^(l - 2)) with 1 + e^-2 = 1.1353352832366128:
    #   l = 0: 1.1353352832366128 / 1.1353352832366128 = 1
    #   l = 1: 1.1353352832366128 / 1.3678794411714423 = 0.8299965984314521
    #   l = 2: 1.1353352832366128 / 2                  = 0.5676676416183064
    #   l = 3: 1.1353352832366128 / 3.718281828459045  = 0.30533868480516063
    expected = torch.tensor([1.0, 0.8299965984314521, 0.5676676416183064, 0.30533868480516063], dtype=torch.float64)
    assert torch.allclose(spl_log(LOSSES.double(), LAM), expected, atol=1e-12)


def test_log_never_overflows():
    v = spl_log(torch.tensor([1e4, 1e30, 0.0]), LAM)
    assert torch.isfinite(v).all()
    assert v[0].item() == pytest.approx(0.0, abs=1e-30) and v[0].item() >= 0.0
    assert v[2].item() == pytest.approx(1.0)
    # large lambda too: e^-lambda underflows to 0 and the weight of l = 0 is still 1
    assert spl_log(torch.tensor([0.0]), 1e4).item() == pytest.approx(1.0)


@pytest.mark.parametrize("rule", [spl_hard, spl_soft, spl_log], ids=["hard", "soft", "log"])
def test_weights_are_per_sample(rule):
    # one easy and one hard sample in the same batch get different weights
    v = rule(torch.tensor([0.5, 1.9, 0.5, 5.0]), LAM)
    assert v.shape == (4,)
    assert v[0] != v[3] and v[0] == v[2]
    if rule is not spl_hard:
        assert v[0] != v[1]  # the graded rules tell two below-lambda samples apart too
    assert len(set(v.tolist())) > 1  # not one scalar broadcast over the batch


# ---------------------------------------------------------------------------------- SampleWeighting


AFFINE = {"name": "affine", "start": 2.0, "slope": 0.5}


def test_weighting_evaluates_lambda_from_its_threshold_schedule():
    # lambda(4) = 2.0 + 0.5 * 4 = 4.0 (an affine threshold ignores the total of 10)
    weighting = build_weighting({"name": "soft", "threshold": AFFINE})
    loss = torch.tensor([1.0, 3.0, 4.0, 5.0])
    v, scalars = weighting(loss, 4, 10)
    # soft at lambda 4: 1 - 1/4 = 0.75, 1 - 3/4 = 0.25, 0 at 4, 0 above
    assert torch.allclose(v, torch.tensor([0.75, 0.25, 0.0, 0.0]))
    assert scalars["weighting/lambda"].item() == pytest.approx(4.0)
    assert scalars["weighting/v_mean"].item() == pytest.approx(0.25)  # (0.75 + 0.25) / 4
    assert scalars["weighting/v_above_half"].item() == pytest.approx(0.25)  # only 0.75


def test_hard_weighting_at_lambda_four():
    weighting = build_weighting({"name": "hard", "threshold": AFFINE})
    v, scalars = weighting(torch.tensor([1.0, 3.0, 4.0, 5.0]), 4, 10)
    assert v.tolist() == [1.0, 1.0, 0.0, 0.0]  # 4 < 4 is false
    assert scalars["weighting/v_mean"].item() == pytest.approx(0.5)
    assert scalars["weighting/v_above_half"].item() == pytest.approx(0.5)


def test_log_weighting_at_lambda_four():
    # (1 + e^-4) / (1 + e^(l - 4)), 1 + e^-4 = 1.0183156388887342:
    #   l = 1: 0.9700211305440644, l = 3: 0.7444483835627034, l = 4: 0.5091578194443671, l = 5: 0.27386725532603085
    weighting = build_weighting({"name": "log", "threshold": AFFINE})
    v, scalars = weighting(torch.tensor([1.0, 3.0, 4.0, 5.0]), 4, 10)
    expected = [0.9700211305440644, 0.7444483835627034, 0.5091578194443671, 0.27386725532603085]
    assert v.tolist() == pytest.approx(expected, rel=1e-6)
    assert scalars["weighting/lambda"].item() == pytest.approx(4.0)
    assert scalars["weighting/v_mean"].item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert scalars["weighting/v_above_half"].item() == pytest.approx(0.75)  # 0.509 at l = lambda counts


def test_lambda_grows_with_t():
    weighting = build_weighting({"name": "hard", "threshold": AFFINE})
    loss = torch.tensor([2.5])
    # lambda(0) = 2.0: 2.5 is too hard; lambda(2) = 3.0: it joins
    assert weighting(loss, 0, 10)[0].item() == 0.0
    assert weighting(loss, 2, 10)[0].item() == 1.0


def test_weights_are_detached_from_the_loss():
    weighting = build_weighting({"name": "log", "threshold": AFFINE})
    loss = torch.tensor([1.0, 3.0], requires_grad=True)
    v, _ = weighting(loss * 2, 0, 10)
    assert not v.requires_grad


def test_uniform_returns_no_weights():
    weighting = build_weighting({"name": "uniform"})
    assert weighting.uniform
    v, scalars = weighting(torch.tensor([0.0, 10.0]), 3, 10)
    assert v is None and scalars == {}


def test_weighting_spec_may_be_an_omegaconf_node():
    weighting = build_weighting(OmegaConf.create({"name": "hard", "threshold": AFFINE}))
    assert isinstance(weighting, SampleWeighting)
    assert weighting(torch.tensor([3.9, 4.1]), 4, 10)[0].tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------- schedules


def test_alpha_adv_piecewise_by_hand():
    # a0 = 1, slope 0.1 per epoch, ramp from k_begin*N = 0.2*250 = 50 to k_end*N = 0.8*250 = 200
    alpha = piecewise(start=1.0, slope=0.1, k_begin=0.2, k_end=0.8)
    N = 250
    assert alpha(0, N) == pytest.approx(1.0)
    assert alpha(30, N) == pytest.approx(1.0)  # flat before the ramp
    assert alpha(50, N) == pytest.approx(1.0)  # the ramp starts from a0, continuously
    assert alpha(125, N) == pytest.approx(8.5)  # 1 + 0.1 * (125 - 50)
    assert alpha(200, N) == pytest.approx(16.0)  # 1 + 0.1 * 150
    assert alpha(230, N) == pytest.approx(16.0)  # flat after the ramp
    assert alpha(250, N) == pytest.approx(16.0)


def test_alpha_adv_with_cudfkd_fractions():
    # k_begin = 1/4, k_end = 3/4, N = 100: ramp from 25 to 75; a0 = 0, slope 0.02
    alpha = piecewise(start=0.0, slope=0.02, k_begin=0.25, k_end=0.75)
    assert [alpha(t, 100) for t in (0, 25, 50, 75, 100)] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_piecewise_rejects_k_begin_after_k_end():
    with pytest.raises(ConfigError, match="k_begin"):
        piecewise(start=1.0, slope=0.1, k_begin=0.8, k_end=0.2)
    with pytest.raises(ConfigError):
        build_schedule({"name": "piecewise", "k_begin": 0.9, "k_end": 0.5}, "generator.weights.adv")


def test_affine_is_lambda_0_plus_a_t():
    lam = affine(start=2.0, slope=0.5)
    assert lam(0, 10) == pytest.approx(2.0)
    assert lam(4, 10) == pytest.approx(4.0)
    assert lam(10, 10) == pytest.approx(7.0)
    assert lam(20, 10) == pytest.approx(12.0)  # unbounded: not clamped at the total


def test_cosine_by_hand():
    f = cosine(start=1.0, end=0.0)
    assert f(0, 10) == pytest.approx(1.0)
    assert f(2.5, 10) == pytest.approx(0.8535533905932737)  # 0.5 (1 + cos(pi/4)) = 0.5 + sqrt(2)/4
    assert f(5, 10) == pytest.approx(0.5)
    assert f(10, 10) == pytest.approx(0.0, abs=1e-12)
    g = cosine(start=0.1, end=0.02)
    assert g(5, 10) == pytest.approx(0.06)  # halfway: the mean of the ends


def test_linear_by_hand():
    f = linear(start=1.0, end=0.2)
    assert f(0, 10) == pytest.approx(1.0)
    assert f(5, 10) == pytest.approx(0.6)
    assert f(10, 10) == pytest.approx(0.2)
    assert f(15, 10) == pytest.approx(0.2)  # clamped after the total


def test_multistep_reaches_a_milestone_exactly_at_it():
    f = multistep(milestones=[6, 3], gamma=0.1, start=2.0)  # unsorted on purpose
    assert f(0, 10) == pytest.approx(2.0)
    assert f(2.999, 10) == pytest.approx(2.0)
    assert f(3, 10) == pytest.approx(0.2)
    assert f(5, 10) == pytest.approx(0.2)
    assert f(6, 10) == pytest.approx(0.02)
    assert f(100, 10) == pytest.approx(0.02)
    with pytest.raises(ConfigError):
        multistep(milestones=[-1.0])


def test_constant():
    f = constant(value=0.3)
    assert [f(t, 10) for t in (0, 5, 10, 50)] == [0.3, 0.3, 0.3, 0.3]


def test_build_schedule_from_a_number_and_from_a_spec():
    assert build_schedule(2, "generator.weights.bn")(7, 10) == 2.0
    assert build_schedule(0.25, "generator.weights.bn")(0, 10) == 0.25
    f = build_schedule({"name": "cosine", "start": 1.0, "end": 0.0}, "optim.schedule")
    assert f(5, 10) == pytest.approx(0.5)
    g = build_schedule(OmegaConf.create({"name": "affine", "start": 2.0, "slope": 0.5}), "weighting.threshold")
    assert g(4, 10) == pytest.approx(4.0)
    p = build_schedule({"name": "piecewise", "start": 1.0, "slope": 0.1, "k_begin": 0.2, "k_end": 0.8}, "w.adv")
    assert p(125, 250) == pytest.approx(8.5)


@pytest.mark.parametrize("bad", ["cosine", "0.5", True, None, [1, 2]])
def test_build_schedule_rejects_non_numbers_naming_the_path(bad):
    with pytest.raises(ConfigError, match=r"generator\.weights\.adv"):
        build_schedule(bad, "generator.weights.adv")


def test_build_schedule_rejects_an_unknown_name_or_option_naming_the_path():
    with pytest.raises(ConfigError, match=r"generator\.weights\.adv"):
        build_schedule({"name": "cosin"}, "generator.weights.adv")
    with pytest.raises(ConfigError, match=r"generator\.weights\.adv"):
        build_schedule({"name": "cosine", "stop": 0.0}, "generator.weights.adv")


# ----------------------------------------------------------------------------------- student losses


def softmax(z: torch.Tensor, T) -> torch.Tensor:
    e = torch.exp(z / T - (z / T).max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    t = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    return s, t


def test_kd_is_t_squared_kl_per_sample_at_t4(logits):
    s, t = logits
    total, raw = StudentLoss({"kd": 1.0})(s, teacher=t, temperature=4.0)
    p, q = softmax(t, 4.0), softmax(s, 4.0)
    expected = 16.0 * (p * (torch.log(p) - torch.log(q))).sum(dim=1)
    assert total.shape == (4,) and raw["kd"].shape == (4,)
    assert torch.allclose(raw["kd"], expected, atol=1e-12)
    assert torch.allclose(total, expected, atol=1e-12)
    # KL(teacher ‖ student), not the reverse
    reverse = 16.0 * (q * (torch.log(q) - torch.log(p))).sum(dim=1)
    assert not torch.allclose(raw["kd"], reverse, atol=1e-3)


def test_kd_with_per_sample_temperatures(logits):
    s, t = logits
    temps = torch.tensor([[1.0], [2.0], [4.0], [20.0]], dtype=torch.float64)
    _, raw = StudentLoss({"kd": 1.0})(s, teacher=t, temperature=temps)
    expected = []
    for i, T in enumerate([1.0, 2.0, 4.0, 20.0]):
        p, q = softmax(t[i : i + 1], T), softmax(s[i : i + 1], T)
        expected.append(T * T * (p * (torch.log(p) - torch.log(q))).sum().item())
    assert raw["kd"].tolist() == pytest.approx(expected, rel=1e-10)


def test_kd_gradient_in_float64(logits):
    s, t = logits
    temps = torch.tensor([[1.0], [2.0], [4.0], [20.0]], dtype=torch.float64)
    loss = StudentLoss({"kd": 1.0})
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss(z, teacher=t, temperature=temps)[0], (s,))


def test_ce_with_label_smoothing_per_sample(logits):
    s, _ = logits
    y = torch.tensor([0, 5, 2, 2])
    eps = 0.1
    logp = torch.log(softmax(s, 1.0))
    # (1 - eps) * (-log p_y) + eps * mean_c(-log p_c)
    expected = (1 - eps) * -logp[torch.arange(4), y] + eps * -logp.sum(dim=1) / 6
    total, raw = StudentLoss({"ce": 1.0}, label_smoothing=eps)(s, labels=y)
    assert torch.allclose(raw["ce"], expected, atol=1e-12)
    plain = StudentLoss({"ce": 1.0})(s, labels=y)[1]["ce"]
    assert torch.allclose(plain, -logp[torch.arange(4), y], atol=1e-12)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the smoothing really applied


def test_l1_per_sample():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 6.0], [1.0, -1.0, 4.0]], dtype=torch.float64)
    _, raw = StudentLoss({"l1": 1.0})(s, teacher=t)
    assert raw["l1"].tolist() == pytest.approx([5.0 / 3, 2.0])  # (0 + 2 + 3)/3 and (1 + 1 + 4)/3


def test_weighted_sum_across_terms(logits):
    s, t = logits
    y = torch.tensor([1, 1, 3, 0])
    loss = StudentLoss({"ce": 0.3, "kd": 0.7, "l1": 2.0})
    assert loss.needs_teacher and loss.needs_labels
    total, raw = loss(s, teacher=t, labels=y, temperature=4.0)
    assert set(raw) == {"ce", "kd", "l1"}
    p, q = softmax(t, 4.0), softmax(s, 4.0)
    kd = 16.0 * (p * (torch.log(p) - torch.log(q))).sum(dim=1)
    ce = -torch.log(softmax(s, 1.0))[torch.arange(4), y]
    l1 = (s - t).abs().sum(dim=1) / 6
    assert torch.allclose(total, 0.3 * ce + 0.7 * kd + 2.0 * l1, atol=1e-12)


def test_student_loss_needs_and_validation():
    assert not StudentLoss({"ce": 1.0}).needs_teacher
    assert not StudentLoss({"kd": 1.0}).needs_labels
    with pytest.raises(ConfigError):
        StudentLoss({})
    with pytest.raises(Exception, match="student losses"):
        StudentLoss({"kdd": 1.0})
