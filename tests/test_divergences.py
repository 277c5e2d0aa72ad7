"""The shared divergences against hand-written references, with float64 gradient checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from generators.divergences import js_div, kl_div, l1_logits


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)


def test_kl_matches_the_definition_at_temperature(logits):
    p, q = logits
    T = 3.0
    pp, qq = F.softmax(p / T, -1), F.softmax(q / T, -1)
    expected = (pp * (pp.log() - qq.log())).sum(-1)
    assert torch.allclose(kl_div(p, q, T), expected, atol=1e-12)
    # torch's own KL (input = log q, target = p) agrees, per sample
    assert torch.allclose(kl_div(p, q, T), F.kl_div(qq.log(), pp, reduction="none").sum(-1), atol=1e-12)


def test_kl_accepts_per_sample_temperatures(logits):
    p, q = logits
    temps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)[:, None]
    per_row = torch.stack([kl_div(p[i : i + 1], q[i : i + 1], float(temps[i])) for i in range(5)]).squeeze(-1)
    assert torch.allclose(kl_div(p, q, temps), per_row, atol=1e-12)


def test_js_is_the_textbook_one(logits):
    p, q = logits
    P, Q = F.softmax(p, -1), F.softmax(q, -1)
    M = (P + Q) / 2
    expected = 0.5 * (P * (P / M).log()).sum(-1) + 0.5 * (Q * (Q / M).log()).sum(-1)
    assert torch.allclose(js_div(p, q), expected, atol=1e-12)
    assert torch.allclose(js_div(p, q, base=2), expected / math.log(2), atol=1e-12)
    assert torch.allclose(js_div(p, q), js_div(q, p), atol=1e-12)  # symmetric, unlike CMI's jsdiv


def test_js_in_bits_is_bounded_by_one():
    far = js_div(torch.tensor([[80.0, -80.0]]), torch.tensor([[-80.0, 80.0]]), base=2)
    assert far.item() == pytest.approx(1.0, abs=1e-6)


def test_l1_matches_torch(logits):
    p, q = logits
    assert torch.allclose(l1_logits(p, q).mean(), F.l1_loss(p, q), atol=1e-12)


@pytest.mark.parametrize("fn", [lambda a, b: kl_div(a, b, 2.0), lambda a, b: js_div(a, b, 1.5), l1_logits])
def test_gradients_in_float64(fn):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: fn(x, y), (a, b))


def test_low_precision_inputs_stay_finite():
    big = torch.tensor([[300.0, -300.0, 0.0]], dtype=torch.bfloat16)
    small = torch.tensor([[-300.0, 300.0, 0.0]], dtype=torch.bfloat16)
    for value in (kl_div(big, small, 1.0), js_div(big, small), l1_logits(big, small)):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
