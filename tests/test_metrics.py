"""Metrics against values worked out by hand (CuDFKD eq. 14-16, DESIGN.md section 5)."""

import math

import pytest
import torch

from dfkd.metrics import histogram, per_sample_metrics, stability, summarize


def _js_nat(p: list[float], q: list[float]) -> float:
    """Textbook JS in nats, written out term by term."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y) if a > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_identical_predictions_have_loyalty_one():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    out = per_sample_metrics(logits, torch.tensor([0, 1]), teacher=logits.clone())
    assert torch.allclose(out["loyalty"], torch.ones(2), atol=1e-6)
    assert torch.allclose(out["loyalty_ref"], torch.ones(2), atol=1e-3)  # fourth root amplifies rounding
    assert out["agree1"].tolist() == [1.0, 1.0]
    assert out["acc1"].tolist() == [1.0, 0.0]


def test_disjoint_predictions_have_loyalty_zero():
    teacher = torch.tensor([[60.0, -60.0]])
    student = torch.tensor([[-60.0, 60.0]])
    out = per_sample_metrics(student, torch.tensor([0]), teacher)
    # P = (1, 0), Q = (0, 1): JS = ln 2 nats = 1 bit.
    assert out["loyalty"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loyalty_ref"].item() == pytest.approx(1 - math.log(2) ** 0.25, abs=1e-6)
    assert out["agree1"].item() == 0.0


def test_loyalty_on_a_worked_example():
    # teacher (0.5, 0.5); student (1, 0) up to e^-100.
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[50.0, -50.0]])
    js = _js_nat([0.5, 0.5], [1.0, 0.0])
    assert js == pytest.approx(0.2157615543, abs=1e-9)
    out = per_sample_metrics(student, torch.tensor([1]), teacher)
    assert out["loyalty"].item() == pytest.approx(1 - math.sqrt(js / math.log(2)), abs=1e-6)  # 0.44208
    assert out["loyalty_ref"].item() == pytest.approx(1 - js**0.25, abs=1e-6)  # 0.31846
    assert out["acc1"].item() == 0.0


def test_teacher_accuracy_rides_along_with_agreement():
    labels = torch.tensor([0, 1, 2, 2])
    teacher = torch.eye(3)[torch.tensor([0, 1, 1, 2])]  # right on three of four
    student = torch.eye(3)[torch.tensor([0, 0, 1, 2])]
    out = summarize(per_sample_metrics(student, labels, teacher))
    assert out["teacher_acc1"] == pytest.approx(75.0)
    assert out["acc1"] == pytest.approx(50.0) and out["agree1"] == pytest.approx(75.0)
    assert "teacher_acc1" not in per_sample_metrics(student, labels)


def test_top5_and_summary_percentages():
    student = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([4, 0])  # rank 5 in row 0 (inside top-5), last in row 1
    out = per_sample_metrics(student, labels)
    assert out["acc5"].tolist() == [1.0, 0.0]
    assert "agree1" not in out
    summary = summarize(out)
    assert summary["acc5"] == pytest.approx(50.0)
    assert summary["acc1"] == pytest.approx(0.0)


def test_summary_keeps_loyalty_as_a_fraction():
    values = {"acc1": torch.tensor([1.0, 0.0, 1.0, 1.0]), "loyalty": torch.tensor([0.5, 1.0, 0.25, 0.25])}
    summary = summarize(values)
    assert summary == {"acc1": pytest.approx(75.0), "loyalty": pytest.approx(0.5)}


def test_stability_window_starts_at_the_fraction():
    acc = [10.0, 20.0, 30.0, 40.0, 50.0]
    epochs = [2, 4, 6, 8, 10]
    out = stability(acc, epochs, total_epochs=10, start=0.5)  # epochs >= 5: 30, 40, 50
    assert out["mean_acc1"] == pytest.approx(40.0)
    assert out["var_acc1"] == pytest.approx(200.0 / 3.0)  # population variance of 30, 40, 50
    assert out["best_acc1"] == 50.0


def test_histogram_bins_values_over_the_unit_interval():
    values = torch.tensor([0.0, 0.009, 0.015, 0.5, 0.999, 1.0, 1.2, -0.1])
    counts = histogram(values, bins=100)
    assert len(counts) == 100 and sum(counts) == 8
    assert counts[0] == 3  # 0.0, 0.009 and the clamped -0.1
    assert counts[1] == 1 and counts[50] == 1
    assert counts[99] == 3  # 0.999, 1.0 and the clamped 1.2: the last bin is closed
