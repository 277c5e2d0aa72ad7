"""The generator's loss terms and the generative synthesizer, against hand-written references.

Each term is checked against a formula written out here (never against another
call of the code under test), its gradient is checked in float64, and it must
stay finite on bfloat16 inputs of large magnitude (STYLE.md point 11). The
teacher and student are tiny in-file Conv-BN-ReLU-Conv-BN-pool-Linear nets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.networks import DCGANGenerator
from generators.synthesizers import GenerativeSynthesizer
from generators.terms import (
    Activation,
    Adversarial,
    Balance,
    BNStatistics,
    OneHot,
    SynthBatch,
    TotalVariation,
    channel_moments,
)

CLASSES = 5


class TinyNet(nn.Module):
    """``[B, 3, S, S] -> [B, CLASSES]``: conv1-bn1-relu-conv2-bn2-relu-pool-fc."""

    def __init__(self, width: int = 4, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


def make_teacher(seed: int = 0, dtype: torch.dtype = torch.float64, float32_stats: bool = True) -> TinyNet:
    """An eval-mode TinyNet whose BN layers carry non-trivial running statistics and affine parameters.

    With ``float32_stats`` the running statistics are values that float32 represents exactly,
    so a reference in float64 is not sensitive to how the term casts them.
    """
    torch.manual_seed(seed)
    net = TinyNet()
    g = torch.Generator().manual_seed(seed + 100)
    for bn in (net.bn1, net.bn2):
        mean = 0.5 * torch.randn(bn.num_features, generator=g, dtype=torch.float64)
        var = 0.5 + torch.rand(bn.num_features, generator=g, dtype=torch.float64)
        if float32_stats:
            mean, var = mean.float().double(), var.float().double()
        with torch.no_grad():
            bn.weight.copy_(1.0 + 0.3 * torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))
        bn.running_mean, bn.running_var = mean, var
    return net.to(dtype).eval()


def bn_inputs_by_hand(net: TinyNet, x: Tensor) -> list[Tensor]:
    """The inputs of bn1 and bn2 in an eval-mode forward, computed functionally (no hooks)."""
    h1 = F.conv2d(x, net.conv1.weight, net.conv1.bias, padding=1)
    bn = net.bn1
    shape = (1, -1, 1, 1)
    a1 = (h1 - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    a1 = F.relu(a1 * bn.weight.view(shape) + bn.bias.view(shape))
    h2 = F.conv2d(a1, net.conv2.weight, net.conv2.bias, padding=1)
    return [h1, h2]


def penultimate_by_hand(net: TinyNet, x: Tensor) -> Tensor:
    """The input of ``fc``: the pooled, ReLU'd output of bn2, computed functionally."""
    _, h2 = bn_inputs_by_hand(net, x)
    bn = net.bn2
    shape = (1, -1, 1, 1)
    a2 = (h2 - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    a2 = F.relu(a2 * bn.weight.view(shape) + bn.bias.view(shape))
    return a2.mean(dim=(2, 3))


def l2(v: Tensor) -> Tensor:
    return torch.sqrt((v**2).sum())


def bn_reference(net: TinyNet, x: Tensor, first_multiplier: float = 1.0, unbiased: bool = False) -> Tensor:
    """``Σ_l m_l (‖mean - running_mean‖₂ + ‖var - running_var‖₂)`` over (N, H, W) of each BN input."""
    total = torch.zeros((), dtype=x.dtype)
    for i, (h, bn) in enumerate(zip(bn_inputs_by_hand(net, x), (net.bn1, net.bn2))):
        n = h.shape[0] * h.shape[2] * h.shape[3]
        mean = h.sum(dim=(0, 2, 3)) / n
        sq = ((h - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        var = sq / (n - 1) if unbiased else sq / n
        d = l2(mean - bn.running_mean) + l2(var - bn.running_var)
        total = total + (first_multiplier if i == 0 else 1.0) * d
    return total


def run_hooked(term, net: nn.Module, x: Tensor) -> Tensor:
    """The term's value on ``x``: a captured teacher forward, then the term."""
    with term.capturing():
        logits = net(x)
    return term(SynthBatch(x=x, teacher=logits))


def softmax_ref(z: Tensor, T: float = 1.0) -> Tensor:
    e = torch.exp(z / T - (z / T).max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def log_softmax_ref(z: Tensor) -> Tensor:
    m = z.max(dim=1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))


def kl_ref(t: Tensor, s: Tensor, T: float) -> Tensor:
    p, q = softmax_ref(t, T), softmax_ref(s, T)
    return (p * (torch.log(p) - torch.log(q))).sum(dim=1)


def js2_ref(t: Tensor, s: Tensor, T: float = 1.0) -> Tensor:
    p, q = softmax_ref(t, T), softmax_ref(s, T)
    m = (p + q) / 2
    return 0.5 * (p * torch.log2(p / m)).sum(dim=1) + 0.5 * (q * torch.log2(q / m)).sum(dim=1)


def l1_ref(t: Tensor, s: Tensor) -> Tensor:
    return (t - s).abs().sum(dim=1) / t.shape[1]


def no_forward_hooks(net: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in net.modules())


def images(n: int = 2, size: int = 2, seed: int = 1, dtype=torch.float64, requires_grad: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------- bn


@pytest.mark.parametrize("first_multiplier", [1.0, 10.0])
def test_bn_equals_the_statistics_of_each_bn_input(first_multiplier):
    net, x = make_teacher(), images(n=3, size=4)
    term = BNStatistics(first_multiplier=first_multiplier)
    term.attach(net)
    value = run_hooked(term, net, x)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(bn_reference(net, x, first_multiplier).item(), rel=1e-10, abs=1e-12)
    term.close()


def test_bn_first_multiplier_weighs_only_the_first_layer():
    net, x = make_teacher(), images(n=3, size=4)
    h1, h2 = bn_inputs_by_hand(net, x)

    def distance(h, bn):
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        return (l2(mean - bn.running_mean) + l2(var - bn.running_var)).item()

    d1, d2 = distance(h1, net.bn1), distance(h2, net.bn2)
    values = {}
    for m in (1.0, 7.0):
        term = BNStatistics(first_multiplier=m)
        term.attach(net)
        values[m] = run_hooked(term, net, x).item()
        term.close()
    assert values[1.0] == pytest.approx(d1 + d2, rel=1e-10)
    assert values[7.0] == pytest.approx(7.0 * d1 + d2, rel=1e-10)


def test_bn_uses_the_biased_variance():
    # 2 images of 2x2 pixels: n = 8 per channel, so unbiased = biased * 8/7, a visible difference
    net, x = make_teacher(), images(n=2, size=2)
    term = BNStatistics()
    term.attach(net)
    value = run_hooked(term, net, x).item()
    biased, unbiased = bn_reference(net, x).item(), bn_reference(net, x, unbiased=True).item()
    assert abs(biased - unbiased) > 1e-3  # the case discriminates
    assert value == pytest.approx(biased, rel=1e-10)
    assert value != pytest.approx(unbiased, rel=1e-6)


def test_bn_keeps_float64_running_statistics_in_float64():
    # A float64 teacher whose running statistics float32 cannot represent exactly: the term
    # must not round them to float32 (upcast keeps float64 as float64, divergences.py).
    net, x = make_teacher(float32_stats=False), images(n=3, size=4)
    term = BNStatistics()
    term.attach(net)
    value = run_hooked(term, net, x)
    assert value.item() == pytest.approx(bn_reference(net, x).item(), rel=1e-12, abs=1e-13)


def test_bn_gradient_wrt_images_in_float64():
    net, x = make_teacher(), images(n=2, size=2, requires_grad=True)
    term = BNStatistics(first_multiplier=3.0)
    term.attach(net)
    assert torch.autograd.gradcheck(lambda inp: run_hooked(term, net, inp), (x,))
    # and the gradient is the reference's gradient
    (g_term,) = torch.autograd.grad(run_hooked(term, net, x), x)
    (g_ref,) = torch.autograd.grad(bn_reference(net, x, 3.0), x)
    assert torch.allclose(g_term, g_ref, atol=1e-10)


def test_bn_on_a_channels_last_teacher_matches_the_reference_and_its_gradient():
    # A channels-last BN input is reduced as its [N·H·W, C] view (generators.terms.channel_moments).
    net = make_teacher().to(memory_format=torch.channels_last)
    x = images(n=2, size=3, requires_grad=True).contiguous(memory_format=torch.channels_last)
    term = BNStatistics(first_multiplier=3.0)
    term.attach(net)
    assert all(h.is_contiguous(memory_format=torch.channels_last) for h in bn_inputs_by_hand(net, x))  # the case tested
    value = run_hooked(term, net, x)
    assert value.item() == pytest.approx(bn_reference(net, x, 3.0).item(), rel=1e-10, abs=1e-12)
    (g_term,) = torch.autograd.grad(value, x)
    (g_ref,) = torch.autograd.grad(bn_reference(net, x, 3.0), x)
    assert torch.allclose(g_term, g_ref, atol=1e-10)
    assert torch.autograd.gradcheck(lambda inp: run_hooked(term, net, inp), (x,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_moments_and_their_fused_gradient_match_a_hand_written_reference(memory_format):
    x = images(n=3, size=4, seed=5).mul(2).add(0.5).contiguous(memory_format=memory_format).requires_grad_(True)
    mean, var = channel_moments(x)
    n = 3 * 4 * 4
    ref_mean = x.sum(dim=(0, 2, 3)) / n
    ref_var = ((x - ref_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / n
    assert torch.allclose(mean, ref_mean, rtol=1e-12) and torch.allclose(var, ref_var, rtol=1e-12)
    g = torch.Generator().manual_seed(6)
    g_mean, g_var = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), x)
    (ref,) = torch.autograd.grad((ref_mean * g_mean).sum() + (ref_var * g_var).sum(), x)
    assert torch.allclose(grad, ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda inp: channel_moments(inp), (x,))


def test_bn_records_nothing_outside_capturing():
    net = make_teacher()
    term = BNStatistics()
    term.attach(net)
    x1, x2 = images(n=3, size=4, seed=1), images(n=3, size=4, seed=2)
    # a forward outside capturing() leaves nothing for the term to read
    logits = net(x1)
    with pytest.raises(RuntimeError, match="capturing"):
        term(SynthBatch(x=x1, teacher=logits))
    # a capture of x1, then an uncaptured forward of x2: the term still measures x1
    with term.capturing():
        logits = net(x1)
    net(x2)
    value = term(SynthBatch(x=x1, teacher=logits)).item()
    assert value == pytest.approx(bn_reference(net, x1).item(), rel=1e-10)
    assert value != pytest.approx(bn_reference(net, x2).item(), rel=1e-6)
    term.close()


def test_bn_close_removes_every_hook():
    net = make_teacher()
    term = BNStatistics()
    term.attach(net)
    assert len(net.bn1._forward_hooks) == 1 and len(net.bn2._forward_hooks) == 1
    term.close()
    assert no_forward_hooks(net)
    with torch.no_grad():
        net(images())  # still runs, and nothing is hooked any more
    assert no_forward_hooks(net)


def test_bn_needs_a_teacher_with_bn_layers():
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatistics().attach(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()))


# ---------------------------------------------------------------------------------------------- oh


def oh_reference(logits: Tensor, targets: Tensor) -> Tensor:
    return -log_softmax_ref(logits)[torch.arange(len(targets)), targets].mean()


def test_oh_is_cross_entropy_against_the_teacher_argmax():
    logits = torch.tensor(
        [[2.0, 0.5, -1.0, 0.0, 0.3], [0.1, 0.2, 3.0, -2.0, 0.0], [-1.0, -1.0, -1.0, 0.5, 0.4]], dtype=torch.float64
    )
    value = OneHot()(SynthBatch(x=torch.zeros(3, 3, 2, 2), teacher=logits))
    assert value.item() == pytest.approx(oh_reference(logits, torch.tensor([0, 2, 3])).item(), rel=1e-12)


def test_oh_uses_the_given_targets():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    value = OneHot()(SynthBatch(x=torch.zeros(2, 3, 2, 2), teacher=logits, targets=targets))
    expected = oh_reference(logits, targets).item()
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert value.item() != pytest.approx(oh_reference(logits, torch.tensor([0, 2])).item(), rel=1e-3)


@pytest.mark.parametrize("with_targets", [False, True])
def test_oh_gradient_in_float64(with_targets):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, CLASSES, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([4, 0, 1, 1]) if with_targets else None
    term = OneHot()
    assert torch.autograd.gradcheck(
        lambda z: term(SynthBatch(x=torch.zeros(4, 3, 2, 2), teacher=z, targets=targets)), (logits,)
    )


# --------------------------------------------------------------------------------------------- adv


@pytest.fixture
def adv_logits():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(4, CLASSES, generator=g, dtype=torch.float64) * 2
    s = torch.randn(4, CLASSES, generator=g, dtype=torch.float64) * 2
    return t, s


def adv_value(term: Adversarial, t: Tensor, s: Tensor) -> Tensor:
    return term(SynthBatch(x=torch.zeros(len(t), 3, 2, 2), teacher=t, student=s))


@pytest.mark.parametrize("t_squared", [False, True])
def test_adv_kl_at_temperature_three(adv_logits, t_squared):
    t, s = adv_logits
    value = adv_value(Adversarial(divergence="kl", temperature=3.0, t_squared=t_squared), t, s)
    expected = -kl_ref(t, s, 3.0).mean() * (9.0 if t_squared else 1.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)


def test_adv_js_is_in_bits_and_bounded(adv_logits):
    t, s = adv_logits
    value = adv_value(Adversarial(divergence="js"), t, s)
    assert value.item() == pytest.approx(-js2_ref(t, s).mean().item(), rel=1e-10)
    assert -1.0 <= value.item() <= 0.0
    # opposite, confident predictions: JS in bits reaches 1
    far_t = torch.tensor([[60.0, -60.0]], dtype=torch.float64)
    far = adv_value(Adversarial(divergence="js"), far_t, -far_t)
    assert far.item() == pytest.approx(-1.0, abs=1e-9)


def test_adv_js_at_a_temperature(adv_logits):
    t, s = adv_logits
    value = adv_value(Adversarial(divergence="js", temperature=3.0), t, s)
    assert value.item() == pytest.approx(-js2_ref(t, s, 3.0).mean().item(), rel=1e-10)


def test_adv_l1_between_logits(adv_logits):
    t, s = adv_logits
    value = adv_value(Adversarial(divergence="l1"), t, s)
    assert value.item() == pytest.approx(-l1_ref(t, s).mean().item(), rel=1e-12)


def test_adv_l1_on_known_numbers():
    t = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 4.0], [1.0, -1.0]], dtype=torch.float64)
    # rows: (1 + 2)/2 = 1.5 and (1 + 1)/2 = 1; mean 1.25
    assert adv_value(Adversarial(divergence="l1"), t, s).item() == pytest.approx(-1.25)


MASK_T = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0]], dtype=torch.float64)  # argmax 0, 1, 2
MASK_S = torch.tensor([[2.0, 0.5, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)  # argmax 0, 0, 2


@pytest.mark.parametrize(
    "divergence, per_sample",
    [
        ("kl", lambda t, s: kl_ref(t, s, 1.0)),
        ("js", lambda t, s: js2_ref(t, s, 1.0)),
        ("l1", l1_ref),
    ],
)
def test_adv_mask_drops_disagreeing_samples_and_averages_over_the_batch(divergence, per_sample):
    d = per_sample(MASK_T, MASK_S)
    d0, d1, d2 = d.tolist()
    assert d1 > 1e-3  # the dropped row would change the value
    masked = adv_value(Adversarial(divergence=divergence, mask=True), MASK_T, MASK_S).item()
    assert masked == pytest.approx(-(d0 + d2) / 3, rel=1e-10)
    assert masked != pytest.approx(-(d0 + d2) / 2, rel=1e-6)  # not the mean over the kept rows
    unmasked = adv_value(Adversarial(divergence=divergence, mask=False), MASK_T, MASK_S).item()
    assert unmasked == pytest.approx(-(d0 + d1 + d2) / 3, rel=1e-10)


def test_adv_mask_with_t_squared_kl_as_cudfkd():
    d = kl_ref(MASK_T, MASK_S, 3.0) * 9.0
    value = adv_value(Adversarial(divergence="kl", temperature=3.0, mask=True, t_squared=True), MASK_T, MASK_S)
    assert value.item() == pytest.approx(-(d[0] + d[2]).item() / 3, rel=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {"divergence": "kl", "temperature": 3.0},
        {"divergence": "kl", "temperature": 3.0, "t_squared": True, "mask": True},
        {"divergence": "js", "temperature": 2.0},
        {"divergence": "js", "mask": True},
        {"divergence": "l1"},
        {"divergence": "l1", "mask": True},
    ],
)
def test_adv_gradient_wrt_student_in_float64(options):
    term = Adversarial(**options)
    s = MASK_S.clone().requires_grad_(True)  # margins of at least 0.5: the mask does not flip under gradcheck's steps
    assert torch.autograd.gradcheck(lambda z: adv_value(term, MASK_T, z), (s,))


def test_adv_rejects_bad_options_and_a_missing_student():
    with pytest.raises(ValueError, match="divergence"):
        Adversarial(divergence="tv")
    with pytest.raises(ValueError, match="temperature"):
        Adversarial(temperature=0.0)
    with pytest.raises(ValueError, match="student"):
        Adversarial()(SynthBatch(x=torch.zeros(1, 3, 2, 2), teacher=torch.zeros(1, 3)))


# --------------------------------------------------------------------------------------------- act


@pytest.mark.parametrize("layer", ["fc", "bn2"])
def test_act_is_minus_mean_abs_of_the_feature_module_input(layer):
    net, x = make_teacher(), images(n=3, size=4)
    feature = penultimate_by_hand(net, x) if layer == "fc" else bn_inputs_by_hand(net, x)[1]
    if layer == "bn2":
        assert (feature < 0).any() and (feature > 0).any()  # the absolute value matters here
    term = Activation()
    term.attach(net, feature_module=getattr(net, layer))
    value = run_hooked(term, net, x)
    assert value.item() == pytest.approx(-(feature.abs().sum() / feature.numel()).item(), rel=1e-10)
    small = images(n=2, size=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: run_hooked(term, net, inp), (small,))
    term.close()
    assert no_forward_hooks(net)


def test_act_records_nothing_outside_capturing_and_needs_a_feature_module():
    net, x = make_teacher(), images()
    with pytest.raises(ValueError, match="feature_module"):
        Activation().attach(net)
    term = Activation()
    term.attach(net, feature_module=net.fc)
    logits = net(x)
    with pytest.raises(RuntimeError):
        term(SynthBatch(x=x, teacher=logits))
    term.close()
    assert no_forward_hooks(net)


# ----------------------------------------------------------------------------------------- balance


def balance_reference(logits: Tensor) -> Tensor:
    pbar = softmax_ref(logits).sum(dim=0) / logits.shape[0]
    return (pbar * torch.log(pbar)).sum()


def balance_value(logits: Tensor) -> Tensor:
    return Balance()(SynthBatch(x=torch.zeros(len(logits), 3, 2, 2), teacher=logits))


def test_balance_is_the_negative_entropy_of_the_mean_prediction():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, CLASSES, generator=g, dtype=torch.float64) * 2
    assert balance_value(logits).item() == pytest.approx(balance_reference(logits).item(), rel=1e-12)


def test_balance_is_minus_log_c_for_a_uniform_mean_prediction():
    # the rows are the cyclic shifts of (2, 0.5, -1): each class gets each value once, so pbar = 1/3
    logits = torch.tensor([[2.0, 0.5, -1.0], [-1.0, 2.0, 0.5], [0.5, -1.0, 2.0]], dtype=torch.float64)
    assert balance_value(logits).item() == pytest.approx(-math.log(3.0), rel=1e-12)


def test_balance_is_zero_when_every_sample_is_confidently_the_same_class():
    logits = torch.tensor([[60.0, 0.0, 0.0, 0.0]] * 4, dtype=torch.float64)
    assert balance_value(logits).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_balance_at_a_temperature_is_the_entropy_of_the_softened_mean_prediction(temperature):
    logits = torch.tensor([[4.0, 0.0, -2.0], [3.0, 1.0, 0.0], [-1.0, 5.0, 0.5]], dtype=torch.float64)
    mean_p = torch.softmax(logits / temperature, dim=1).mean(dim=0)
    expected = (mean_p * mean_p.log()).sum()
    value = Balance(temperature=temperature)(SynthBatch(x=torch.zeros(3, 1, 1, 1), teacher=logits))
    torch.testing.assert_close(value, expected)


def test_balance_at_the_kd_temperature_is_much_weaker_than_at_one():
    logits = torch.tensor([[8.0, 0.0, 0.0], [7.0, 0.0, 1.0]], dtype=torch.float64)  # both samples say class 0
    at = {t: Balance(temperature=t)(SynthBatch(x=torch.zeros(2, 1, 1, 1), teacher=logits)).item() for t in (1.0, 20.0)}
    uniform = -math.log(3)
    assert at[1.0] > -0.1, "at T = 1 a one-class batch is far from balanced"
    assert at[20.0] - uniform < 0.02, "at T = 20 every prediction is nearly uniform already"


def test_balance_gradient_in_float64():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, CLASSES, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(balance_value, (logits,))


# ---------------------------------------------------------------------------------------------- tv


RAMP = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3)  # x[i, j] = 3i + j


def tv_value(x: Tensor, norm: str) -> Tensor:
    return TotalVariation(norm=norm)(SynthBatch(x=x, teacher=torch.zeros(len(x), CLASSES)))


def test_tv_on_a_ramp_worked_out_by_hand():
    # horizontal differences x[i, j] - x[i, j+1] = -1   (6 of them)
    # vertical   differences x[i, j] - x[i+1, j] = -3   (6)
    # diagonal   x[i+1, j] - x[i, j+1]          = +2   (4)
    # diagonal   x[i, j]   - x[i+1, j+1]        = -4   (4)
    # l2: sqrt(6·1) + sqrt(6·9) + sqrt(4·4) + sqrt(4·16) = 4·sqrt(6) + 12
    # l1: the means of the absolute values, 1 + 3 + 2 + 4 = 10
    assert tv_value(RAMP, "l2").item() == pytest.approx(4 * math.sqrt(6) + 12, rel=1e-12)
    assert tv_value(RAMP, "l1").item() == pytest.approx(10.0, rel=1e-12)


def test_tv_of_a_constant_image_is_zero_and_channels_add_up():
    assert tv_value(torch.full((2, 3, 4, 4), 0.7, dtype=torch.float64), "l1").item() == 0.0
    two = torch.cat([RAMP, 2 * RAMP], dim=1)  # a second channel with every difference doubled
    # l1: the mean over both channels of |d| is (1 + 2)/2 times that of the ramp alone
    assert tv_value(two, "l1").item() == pytest.approx(15.0, rel=1e-12)
    # l2: each norm over both channels is sqrt(1 + 4) times the ramp's
    assert tv_value(two, "l2").item() == pytest.approx(math.sqrt(5) * (4 * math.sqrt(6) + 12), rel=1e-12)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_tv_gradient_in_float64(norm):
    x = images(n=2, size=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: tv_value(inp, norm), (x,))


def test_tv_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        TotalVariation(norm="l3")


# ----------------------------------------------------------------------------------- low precision


def test_hooked_terms_stay_finite_under_bf16_autocast_with_large_inputs():
    net = make_teacher(dtype=torch.float32)
    bn, act = BNStatistics(first_multiplier=10.0), Activation()
    bn.attach(net)
    act.attach(net, feature_module=net.fc)
    x = (images(n=4, size=4, dtype=torch.float32) * 1e3).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with bn.capturing(), act.capturing():
            logits = net(x)
    assert logits.dtype == torch.bfloat16  # autocast really ran the teacher in bf16
    batch = SynthBatch(x=x, teacher=logits)
    values = [bn(batch), act(batch)]
    for v in values:
        assert torch.isfinite(v).all() and v.dtype == torch.float32
    sum(values).backward()
    assert torch.isfinite(x.grad).all()
    bn.close(), act.close()


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize(
    "term",
    [
        OneHot(),
        Adversarial(divergence="kl", temperature=3.0, t_squared=True),
        Adversarial(divergence="kl", mask=True),
        Adversarial(divergence="js"),
        Adversarial(divergence="l1"),
        Balance(),
    ],
    ids=["oh", "kl", "kl-masked", "js", "l1", "balance"],
)
def test_logit_terms_stay_finite_on_large_bf16_logits(term, scale):
    g = torch.Generator().manual_seed(9)
    t = (torch.randn(6, CLASSES, generator=g) * scale).bfloat16().requires_grad_(True)
    s = (torch.randn(6, CLASSES, generator=g) * scale).bfloat16()
    s[:3] = t[:3].detach()  # some rows agree, so the masked term keeps them
    s.requires_grad_(True)
    value = term(SynthBatch(x=torch.zeros(6, 3, 2, 2), teacher=t, student=s))
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(t.grad.float()).all()
    if term.needs_student:
        assert torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_tv_stays_finite_on_large_bf16_images(norm):
    x = (images(n=2, size=8, dtype=torch.float32) * 1e3).bfloat16().requires_grad_(True)
    value = tv_value(x, norm)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert torch.isfinite(x.grad.float()).all()


# ------------------------------------------------------------------------------ GenerativeSynthesizer


WEIGHTS = {"bn": 1.0, "oh": 0.5, "adv": 2.0, "balance": 20.0, "act": 0.1}


def make_synthesizer(
    sample_from: str = "eval", batch_size: int = 4, g_steps: int = 1, reset_on_collapse: bool = False,
    conditional: bool = False,
):
    torch.manual_seed(0)
    generator = DCGANGenerator(image_size=8, channels=3, nz=8, ngf=4, conditional=conditional, num_classes=CLASSES)
    terms = {
        "bn": BNStatistics(),
        "oh": OneHot(),
        "adv": Adversarial(divergence="kl", temperature=3.0, mask=False, t_squared=True),
        "balance": Balance(),
        "act": Activation(),
    }
    synth = GenerativeSynthesizer(
        generator,
        terms,
        normalize=lambda x: (x - 0.5) / 0.25,
        denormalize=lambda x: x * 0.25 + 0.5,
        num_classes=CLASSES,
        batch_size=batch_size,
        g_steps=g_steps,
        lr=1e-2,
        sample_from=sample_from,
        reset_on_collapse=reset_on_collapse,
        targets="random" if conditional else "argmax",
    )
    teacher = make_teacher(seed=1, dtype=torch.float32)
    torch.manual_seed(2)
    student = TinyNet()
    synth.attach(teacher, feature_module=teacher.fc)
    return synth, teacher, student


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_step_trains_only_the_generator_and_keeps_modes():
    synth, teacher, student = make_synthesizer(g_steps=2)
    teacher.eval()
    student.train()
    before = {"generator": snapshot(synth.generator), "teacher": snapshot(teacher), "student": snapshot(student)}
    synth.step(teacher, student, WEIGHTS)
    after = {"generator": snapshot(synth.generator), "teacher": snapshot(teacher), "student": snapshot(student)}
    changed = [k for k in before["generator"] if not torch.equal(before["generator"][k], after["generator"][k])]
    assert any(k.endswith("weight") for k in changed)  # the generator's parameters moved
    for name in ("teacher", "student"):  # parameters and BN buffers alike
        for k in before[name]:
            assert torch.equal(before[name][k], after[name][k]), f"{name}.{k} changed"
    for net in (teacher, student):
        assert all(p.grad is None for p in net.parameters())
    assert all(not m.training for m in teacher.modules())
    assert all(m.training for m in student.modules())
    synth.close()
    assert no_forward_hooks(teacher)


def test_step_with_a_training_teacher_and_an_eval_student_restores_both():
    synth, teacher, student = make_synthesizer()
    teacher.train()
    student.eval()
    synth.step(teacher, student, WEIGHTS)
    assert all(m.training for m in teacher.modules())
    assert all(not m.training for m in student.modules())


def test_step_returns_every_term_raw_and_weighted():
    synth, teacher, student = make_synthesizer()
    logs = synth.step(teacher, student, WEIGHTS)
    assert set(logs) == {"loss", "spread", *WEIGHTS, *(f"{k}_weighted" for k in WEIGHTS)}
    assert logs["spread"].item() > 0  # distinct noise vectors make distinct images
    total = 0.0
    for name, w in WEIGHTS.items():
        raw, weighted = logs[name].item(), logs[f"{name}_weighted"].item()
        assert math.isfinite(raw)
        assert weighted == pytest.approx(w * raw, rel=1e-6)
        total += weighted
    assert logs["loss"].item() == pytest.approx(total, rel=1e-6)
    assert logs["bn"].item() > 0 and logs["act"].item() <= 0 and -math.log(CLASSES) - 1e-6 <= logs["balance"].item()
    assert all(not v.requires_grad for v in logs.values())  # detached, for logging


def test_zero_weight_terms_are_not_computed_and_skip_the_student():
    """Before alpha_adv's ramp starts the adv weight is 0: no student forward, no adv log, hooks idle."""
    synth, teacher, student = make_synthesizer()
    calls: list[int] = []
    handle = student.register_forward_hook(lambda m, i, o: calls.append(1))
    logs = synth.step(teacher, student, {**WEIGHTS, "adv": 0.0, "act": 0.0})
    assert calls == []
    assert "adv" not in logs and "act" not in logs and "bn" in logs
    assert logs["loss"].item() == pytest.approx(sum(logs[f"{k}_weighted"].item() for k in ("bn", "oh", "balance")))
    synth.step(teacher, student, WEIGHTS)  # and once the weight is nonzero, it is computed again
    assert len(calls) == 1
    handle.remove()


def test_step_without_a_weight_raises():
    synth, teacher, student = make_synthesizer()
    weights = {k: v for k, v in WEIGHTS.items() if k != "adv"}
    with pytest.raises(KeyError, match="adv"):
        synth.step(teacher, student, weights)


def test_sample_from_last_returns_the_last_batch_and_its_teacher_logits():
    synth, teacher, student = make_synthesizer(sample_from="last", batch_size=4)
    seen: list[Tensor] = []
    handle = teacher.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach().clone()))
    synth.step(teacher, student, WEIGHTS)
    handle.remove()
    x, logits = synth.sample(4)
    assert len(seen) == 1  # one generator step, one teacher forward
    assert torch.equal(x, seen[-1])  # exactly the batch the teacher saw in the step
    assert x.shape == (4, 3, 8, 8) and not x.requires_grad
    with torch.no_grad():
        expected = teacher.eval()(x)
    assert logits is not None and torch.allclose(logits, expected, atol=1e-6)
    # a second sample returns the same batch, not a fresh draw
    assert torch.equal(synth.sample(4)[0], x)
    with pytest.raises(RuntimeError, match="batch size"):
        synth.sample(3)


def test_sample_from_last_before_any_step_raises():
    synth, _, _ = make_synthesizer(sample_from="last")
    with pytest.raises(RuntimeError):
        synth.sample(4)


def test_sample_from_eval_draws_fresh_normalised_images():
    synth, teacher, student = make_synthesizer(sample_from="eval")
    synth.step(teacher, student, WEIGHTS)
    synth.generator.train()
    x1, logits = synth.sample(3)
    x2, _ = synth.sample(3)
    assert logits is None and x1.shape == (3, 3, 8, 8) and not torch.equal(x1, x2)
    assert synth.generator.training  # the generator's mode is restored
    # sigmoid images in (0, 1), normalised by (x - 0.5) / 0.25: inside (-2, 2)
    assert x1.min() > -2.0 and x1.max() < 2.0


def kill(generator: nn.Module) -> None:
    """Zero the last convolution: every noise vector then makes the same image (a collapsed generator)."""
    last = [m for m in generator.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


def test_a_collapsed_generator_is_reinitialised_and_its_adam_state_forgotten():
    synth, teacher, student = make_synthesizer(reset_on_collapse=True)
    kill(synth.generator)
    logs = synth.step(teacher, student, WEIGHTS)
    assert logs["spread"].item() < 1e-6  # the batch of this update was one image...
    assert synth.resets == 1 and logs["resets"].item() == 1.0
    last = [m for m in synth.generator.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last.weight.abs().sum() > 0  # ...so the generator was drawn afresh
    assert all(p not in synth.optimizer.state for p in synth.generator.parameters())
    x, _ = synth.sample(4)
    assert x.std(dim=0).mean() > 1e-3  # and makes distinct images again
    logs = synth.step(teacher, student, WEIGHTS)
    assert synth.resets == 1 and logs["resets"].item() == 1.0  # a healthy generator is left alone


def test_a_collapsed_generator_is_kept_unless_reset_is_asked_for():
    synth, teacher, student = make_synthesizer()
    kill(synth.generator)
    logs = synth.step(teacher, student, WEIGHTS)
    assert "resets" not in logs and synth.resets == 0
    x, _ = synth.sample(4)
    assert x.std(dim=0).mean() < 1e-3  # still one image: only Adam's first small step moved it


@contextlib.contextmanager
def _recording_labels(synth: GenerativeSynthesizer) -> Iterator[list[Tensor]]:
    """The labels each forward of the synthesizer's generator is given in the block."""
    seen: list[Tensor] = []
    handle = synth.generator.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_a_conditional_generator_is_asked_for_the_classes_the_oh_term_trains_it_on():
    synth, teacher, student = make_synthesizer(batch_size=16, conditional=True)
    trained_on: list[Tensor] = []
    synth.terms["oh"].register_forward_pre_hook(lambda module, args: trained_on.append(args[0].targets.clone()))
    with _recording_labels(synth) as asked:
        synth.step(teacher, student, WEIGHTS)
        x, _ = synth.sample(32)  # the student's samples are asked for classes too
    assert len(asked) == 2 and len(trained_on) == 1
    assert torch.equal(asked[0], trained_on[0])
    assert asked[0].shape == (16,) and asked[0].min() >= 0 and asked[0].max() < CLASSES
    assert x.shape == (32, 3, 8, 8) and asked[1].shape == (32,) and len(asked[1].unique()) > 1


def test_a_conditional_generator_learns_to_make_the_class_it_is_asked_for():
    synth, _, student = make_synthesizer(batch_size=64, conditional=True)
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, CLASSES)).eval()  # every class within reach
    weights = {name: 0.0 for name in WEIGHTS} | {"oh": 1.0}

    def hits() -> float:
        with _recording_labels(synth) as asked, torch.no_grad():
            x, _ = synth.sample(256)
            return (teacher(x).argmax(1) == asked[0]).float().mean().item()

    before = hits()
    for _ in range(60):
        synth.step(teacher, student, weights)
    after = hits()
    assert before < 0.5 and after > 0.9, (before, after)


def test_a_conditional_generator_needs_random_targets():
    generator = DCGANGenerator(image_size=8, channels=3, nz=8, ngf=4, conditional=True, num_classes=CLASSES)
    with pytest.raises(ValueError, match="targets='random'"):
        GenerativeSynthesizer(
            generator, {"oh": OneHot()}, normalize=lambda x: x, denormalize=lambda x: x, num_classes=CLASSES,
            batch_size=4,
        )
