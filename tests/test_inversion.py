"""Inversion by rounds (DeepInversion, CMI), CMI's contrastive term and the pool source, on tiny CPU models."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import Tensor, nn

import generators.inversion as inversion_module
from dfkd.data import DATASETS
from dfkd.data.transforms import Normalize, build_augmentation, to_unit
from dfkd.errors import ConfigError
from dfkd.models import create_model
from dfkd.recipe import load_config
from dfkd.sources import Context, PoolSource, SourceEnv
from dfkd.sources.pool import quantize
from dfkd.trainer import Trainer
from dfkd.weights import save_model
from generators.contrastive import Contrastive, info_nce
from generators.inversion import InversionSynthesizer
from generators.networks import GENERATORS
from generators.terms import TERMS, SynthBatch, Term

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # image side of the unit tests
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class TinyNet(nn.Module):
    """Two conv-BN-ReLU blocks, global pooling and a linear classifier: ``[B, 3, S, S] -> [B, 10]``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12)
        self.linear = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean(dim=(2, 3)))


def tiny_teacher(seed: int = 0) -> TinyNet:
    """A frozen TinyNet in eval mode whose BN running statistics are not the defaults."""
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 3, SIZE, SIZE) * 2)
    return net.eval().requires_grad_(False)


class Scripted(Term):
    """A term whose value at the i-th call is ``values[i]``, plus a tiny pull of the images towards 0.5.

    The pull keeps the images moving from one update to the next (so every
    iteration's batch is different) while the scripted values decide which one is lowest.
    """

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values
        self.seen: list[Tensor] = []  # the [0, 1] batch of every call

    def forward(self, batch: SynthBatch) -> Tensor:
        self.seen.append(batch.unit.detach().clone())
        value = self.values[(len(self.seen) - 1) % len(self.values)]
        return value + 1e-4 * (batch.unit - 0.5).square().mean()


def make_synth(
    terms: dict[str, Term], *, generator: bool = False, batch_size: int = 4, g_steps: int = 3, lr: float = 0.1,
    teacher: nn.Module | None = None,
) -> tuple[InversionSynthesizer, nn.Module]:
    teacher = teacher or tiny_teacher()
    normalize = Normalize(MEAN, STD)
    net = GENERATORS.get("dcgan")(image_size=SIZE, channels=3, nz=8, ngf=4) if generator else None
    synth = InversionSynthesizer(
        terms, normalize, normalize.inverse, 10, (3, SIZE, SIZE), net, batch_size=batch_size, g_steps=g_steps, lr=lr,
    )
    synth.attach(teacher)
    return synth, teacher


def weights_of(synth: InversionSynthesizer) -> dict[str, float]:
    return {name: 1.0 for name in synth.terms}


# --------------------------------------------------------------------------- the contrastive loss


def test_info_nce_matches_a_hand_written_reference():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    tau = 0.1

    def row_loss(i: int) -> float:
        sims = [sum(q[i, d].item() * k[j, d].item() for d in range(4)) / tau for j in range(5)]
        return -(sims[i] - math.log(sum(math.exp(s) for s in sims)))

    rows = [row_loss(i) for i in range(5)]
    with_bank = sum(rows[:3]) / 3 + sum(rows[3:]) / 2  # 3 current rows, 2 bank rows: two means, summed
    without_bank = sum(rows) / 5
    assert info_nce(q, k, 3, tau).item() == pytest.approx(with_bank, rel=1e-12)
    assert info_nce(q, k, 5, tau).item() == pytest.approx(without_bank, rel=1e-12)


def test_contrastive_gradient_in_float64_flows_through_the_local_view_only():
    term = Contrastive(head_dim=4, bank_size=8, n_neg=4)
    term.attach(tiny_teacher())
    term.head.double()
    dim = 8 + 12  # BN channels of TinyNet
    torch.manual_seed(1)
    local = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    global_ = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    cached = torch.randn(2, 2 * dim, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda features: term.loss(features, global_.detach(), cached), (local,))

    term.loss(local, global_, cached).backward()
    assert global_.grad is None, "CMI detaches the global view's projections"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.head.parameters())
    term.head.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = term.loss(local.detach().float(), global_.detach().float(), cached.half())
    assert low.dtype == torch.float32 and torch.isfinite(low), "bf16 projections, float32 logits"


def test_contrastive_features_are_the_bn_inputs_or_without_bn_the_conv_outputs():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    with_bn = tiny_teacher()
    bn_inputs = []
    handles = [m.register_forward_hook(lambda m, i, o: bn_inputs.append(i[0].mean(dim=(2, 3))))
               for m in with_bn.modules() if isinstance(m, nn.BatchNorm2d)]
    term = Contrastive(head_dim=4, bank_size=8, n_neg=4)
    term.attach(with_bn)
    with term.capturing():
        with_bn(x)
    assert torch.equal(torch.cat(term._take(), dim=1), torch.cat(bn_inputs, dim=1))
    for handle in handles:
        handle.remove()

    lenet = create_model("lenet5", num_classes=10, in_channels=1).eval()  # no BatchNorm anywhere
    conv_outputs = []
    for m in lenet.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: conv_outputs.append(o.mean(dim=(2, 3))))
    term = Contrastive(head_dim=4, bank_size=8, n_neg=4)
    term.attach(lenet)
    assert term.head.net[0].in_features == sum(m.out_channels for m in lenet.modules() if isinstance(m, nn.Conv2d))
    with term.capturing():
        lenet(torch.randn(3, 1, 32, 32))
    assert torch.equal(torch.cat(term._take(), dim=1), torch.cat(conv_outputs, dim=1))
    term.close()
    assert not term.attached

    with pytest.raises(ValueError, match="BatchNorm2d or Conv2d"):
        Contrastive().attach(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# --------------------------------------------------------------------------- rounds


def test_inversion_keeps_the_lowest_loss_batch_and_never_syncs_with_the_device(monkeypatch):
    calls = _spy_on_host_syncs(monkeypatch)
    scripted = Scripted([5.0, 3.0, 1.0, 4.0, 2.0])
    synth, teacher = make_synth({"scripted": scripted, "oh": TERMS.get("oh")()}, g_steps=5)
    logs = synth.step(teacher, None, {"scripted": 1.0, "oh": 1e-6})
    assert calls == [], "the round must not wait for the device"

    assert not torch.equal(scripted.seen[2], scripted.seen[4]), "the batch changes from one update to the next"
    assert torch.equal(synth.best_images(), scripted.seen[2]), "the third batch has the lowest loss"
    assert logs["scripted"].item() == pytest.approx(1.0, abs=1e-3), "the logs are the kept batch's"
    assert torch.equal(synth.preview(2), scripted.seen[2][:2])
    x, logits = synth.sample(4)
    assert logits is None and torch.allclose(synth.normalize.inverse(x), scripted.seen[2], atol=1e-6)


def test_a_cmi_round_with_the_contrastive_term_never_syncs_with_the_device(monkeypatch):
    calls = _spy_on_host_syncs(monkeypatch)
    terms = {
        "bn": TERMS.get("bn")(), "oh": TERMS.get("oh")(), "adv": TERMS.get("adv")(mask=True),
        "contrastive": Contrastive(head_dim=4, bank_size=8, n_neg=4),
    }
    synth, teacher = make_synth(terms, generator=True, lr=1e-3)
    student = TinyNet().eval()
    for _ in range(2):  # the second round draws negatives from the bank
        synth.step(teacher, student, weights_of(synth))
    assert calls == []


def test_every_round_starts_from_a_fresh_generator_and_fresh_codes(monkeypatch):
    starts: list[dict[str, Tensor]] = []  # the generator's weights right after each re-initialisation
    reset_parameters = inversion_module.reset_parameters_dcgan

    def reset_and_record(module: nn.Module) -> None:
        reset_parameters(module)
        starts.append(copy.deepcopy(module.state_dict()))

    monkeypatch.setattr(inversion_module, "reset_parameters_dcgan", reset_and_record)
    scripted = Scripted([1.0])
    synth, teacher = make_synth({"scripted": scripted, "oh": TERMS.get("oh")()}, generator=True, g_steps=2)
    synth.step(teacher, None, weights_of(synth))
    end_of_first = copy.deepcopy(synth.generator.state_dict())
    synth.step(teacher, None, weights_of(synth))

    assert len(starts) == 2, "one re-initialisation per round"
    conv = "stages.1.1.weight"
    assert not torch.equal(starts[0][conv], end_of_first[conv]), "round 1 trained the generator"
    assert not torch.equal(starts[1][conv], end_of_first[conv]), "round 2 does not continue from round 1"
    assert not torch.equal(starts[1][conv], starts[0][conv]), "each re-initialisation is a fresh draw"
    assert 0.01 < starts[1][conv].std().item() < 0.03, "DCGAN initialisation: N(0, 0.02^2)"
    assert not torch.equal(scripted.seen[2], scripted.seen[1]), "round 2's first batch is not round 1's last"


@pytest.mark.parametrize("generator", [False, True])
def test_a_round_driven_one_update_at_a_time_is_the_round_of_step(generator):
    def terms() -> dict[str, Term]:
        return {"bn": TERMS.get("bn")(), "oh": TERMS.get("oh")()}

    torch.manual_seed(3)
    whole, teacher = make_synth(terms(), generator=generator, g_steps=3)
    logs = whole.step(teacher, None, weights_of(whole))

    torch.manual_seed(3)
    parts, teacher = make_synth(terms(), generator=generator, g_steps=3)
    current = parts.begin_round(torch.device("cpu"))
    for _ in range(3):
        parts.update(current, teacher, None, weights_of(parts))
    assert current.updates == 3
    assert torch.equal(parts.finish_round(current)["loss"], logs["loss"])
    assert torch.equal(parts.best_images(), whole.best_images())
    with pytest.raises(RuntimeError, match="at least one update"):
        parts.finish_round(parts.begin_round(torch.device("cpu")))


def test_pixel_rounds_start_from_fresh_noise_and_stay_in_the_image_box():
    scripted = Scripted([1.0])
    synth, teacher = make_synth({"scripted": scripted, "oh": TERMS.get("oh")()}, batch_size=8, g_steps=3, lr=0.5)
    synth.step(teacher, None, weights_of(synth))
    synth.step(teacher, None, weights_of(synth))
    first_of_second = scripted.seen[3]
    assert not torch.equal(first_of_second, scripted.seen[2])
    noise = synth.normalize(first_of_second)  # the teacher-space pixels as drawn: N(0, 1)
    assert abs(noise.mean().item()) < 0.1 and 0.9 < noise.std().item() < 1.1
    later = scripted.seen[1]  # after one update and the clip of DeepInversion
    assert later.min() >= -1e-6 and later.max() <= 1 + 1e-6


# --------------------------------------------------------------------------- the memory bank


def test_the_bank_is_a_bounded_float16_ring_fed_once_per_round_with_the_kept_features(monkeypatch):
    term = Contrastive(head_dim=4, bank_size=10, n_neg=6)
    synth, teacher = make_synth({"contrastive": term, "oh": TERMS.get("oh")()}, generator=True, g_steps=3, lr=1e-2)
    features: list[Tensor] = []
    totals: list[Tensor] = []
    original_forward, original_losses = Contrastive.forward, synth.losses

    def forward(self: Contrastive, batch: SynthBatch) -> Tensor:
        value = original_forward(self, batch)
        features.append(self._latest.clone())
        return value

    def losses(*args, **kwargs):
        total, logs, batch = original_losses(*args, **kwargs)
        totals.append(total.detach())
        return total, logs, batch

    monkeypatch.setattr(Contrastive, "forward", forward)
    monkeypatch.setattr(synth, "losses", losses)
    head_before = copy.deepcopy(term.head.state_dict())
    dim = 2 * (8 + 12)
    for round_index, filled in enumerate((4, 8, 10)):
        synth.step(teacher, None, weights_of(synth))
        assert len(term.bank) == filled, "one batch of 4 per round, at most 10 rows"
        these = slice(3 * round_index, 3 * round_index + 3)
        kept = features[these][int(torch.stack(totals[these]).argmin())]
        assert torch.equal(term.bank.newest(4), kept.half()), "the kept batch's (local, global) features"
    assert term.bank.data.shape == (10, dim) and term.bank.data.dtype == torch.float16
    assert term.bank.data.device == teacher.bn1.running_mean.device
    assert term.bank.cursor == 2, "12 rows into 10: the two oldest were overwritten"
    assert any(not torch.equal(head_before[k], v) for k, v in term.head.state_dict().items()), "the head is trained"
    assert {"bank.data", "bank._extra_state", "head.net.0.weight"} <= set(term.state_dict())


def test_close_removes_every_hook_from_the_teacher():
    terms = {"bn": TERMS.get("bn")(), "contrastive": Contrastive(head_dim=4, bank_size=8, n_neg=4)}
    synth, teacher = make_synth(terms, generator=True, g_steps=1)
    synth.step(teacher, None, weights_of(synth))
    assert any(m._forward_hooks for m in teacher.modules())
    synth.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())


# --------------------------------------------------------------------------- the pool source


def _source(tmp_path: Path, teacher: nn.Module, *extra: str, seed: int = 0) -> PoolSource:
    cfg = load_config(None, [
        "student.arch=lenet5_half", f"output_dir={tmp_path}",
        "synthesizer={name: inversion, generator: {name: dcgan, nz: 8, ngf: 4}, g_steps: 2, "
        "terms: {bn: 1, oh: 1, contrastive: {weight: 0.8, head_dim: 4, bank_size: 16, n_neg: 8}}}",
        *extra,
    ])
    spec = dataclasses.replace(DATASETS.get("procedural"), image_size=SIZE, mean=MEAN, std=STD)
    env = SourceEnv(
        cfg=cfg, spec=spec, train_set=lambda: None, normalize=Normalize(MEAN, STD),
        augment=build_augmentation("crop_flip", SIZE), accelerator=Accelerator(), seed=seed, teacher=teacher,
    )
    options = OmegaConf.to_container(cfg.source)
    options.pop("name")
    return PoolSource(env, **options)


def _ctx(teacher: nn.Module, step: int = 0) -> Context:
    return Context(teacher=teacher, student=TinyNet(), epoch=0, step=step, epochs=1, steps_per_epoch=100)


def test_the_pool_holds_uint8_images_and_overwrites_the_oldest(tmp_path):
    teacher = tiny_teacher()
    source = _source(tmp_path, teacher, "source={name: pool, batch_size: 4, pool_size: 10, rounds_every: 1}")
    kept = []
    for _ in range(3):
        batch = source.next_batch(_ctx(teacher))
        kept.append(quantize(source.synthesizer.best_images()))
        assert batch.x.shape == (4, 3, SIZE, SIZE) and batch.x.dtype == torch.float32
    pool = source.pool
    assert pool.data.dtype == torch.uint8 and pool.data.shape == (10, 3, SIZE, SIZE) and len(pool) == 10
    assert torch.equal(pool.data[:2], kept[2][2:]), "round 3 wrapped around onto round 1's first images"
    assert torch.equal(pool.data[2:4], kept[0][2:]), "round 1's last images are still there"
    assert torch.equal(pool.data[4:8], kept[1])
    assert torch.equal(source.preview(4), to_unit(kept[2]))


def test_reads_are_augmented_on_the_fly_with_the_same_shape(tmp_path):
    teacher = tiny_teacher()
    source = _source(tmp_path, teacher, "source={name: pool, batch_size: 8, rounds_every: 5}")
    step = source._served
    batch = source.next_batch(_ctx(teacher))
    plain = source.normalize(to_unit(source.read(8, step)))  # the same draw, without augmentation
    assert batch.x.shape == plain.shape
    assert not torch.equal(batch.x, plain)
    source.augment = nn.Identity()
    step = source._served
    assert torch.equal(source.next_batch(_ctx(teacher)).x, source.normalize(to_unit(source.read(8, step))))


def test_the_pool_source_resumes_exactly_from_its_state_dict(tmp_path):
    teacher = tiny_teacher()
    spec = "source={name: pool, batch_size: 4, pool_size: 12, rounds_every: 2}"
    first = _source(tmp_path, teacher, spec)
    for _ in range(3):  # rounds at steps 0 and 2
        first.next_batch(_ctx(teacher))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what a checkpoint does, read back as the engine reads it
    generator_state = copy.deepcopy(first.checkpoint_modules()["generator"].state_dict())
    torch.manual_seed(7)
    expected = [first.next_batch(_ctx(teacher)).x for _ in range(2)]  # a read, then a round and a read
    first.synthesizer.close()

    torch.manual_seed(123)  # a different initialisation of the head and the generator
    resumed = _source(tmp_path, teacher, spec)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.checkpoint_modules()["generator"].load_state_dict(generator_state)
    torch.manual_seed(7)
    got = [resumed.next_batch(_ctx(teacher)).x for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert torch.equal(resumed.pool.data, first.pool.data), "the round after the resume kept the same batch"
    banks = [source.synthesizer.terms["contrastive"].bank for source in (first, resumed)]
    assert len(banks[1]) == 12 and torch.equal(banks[0].data, banks[1].data)


def test_the_pool_source_needs_a_synthesizer_that_keeps_a_batch_per_round(tmp_path):
    teacher = tiny_teacher()
    with pytest.raises(ConfigError, match="best_images"):
        _source(
            tmp_path, teacher, "source={name: pool, batch_size: 4}",
            "synthesizer={name: generative, generator: {name: dcgan, nz: 8, ngf: 4}, terms: {oh: 1}}",
        )


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("synthesizer", [
    "{name: inversion, g_steps: 2, lr: 0.1, betas: [0.5, 0.99], "
    "terms: {bn: 10, oh: 1, tv: 0.001, adv: {weight: 1, divergence: js, temperature: 3}}}",
    "{name: inversion, generator: {name: dcgan, nz: 16, ngf: 8}, g_steps: 2, "
    "terms: {bn: 1, oh: 1, adv: {weight: 0.5, mask: true}, contrastive: {weight: 0.8, bank_size: 64, n_neg: 16}}}",
], ids=["deepinversion", "cmi"])
def test_two_engine_steps_from_a_pool(tmp_path, synthesizer):
    teacher = tmp_path / "teacher.safetensors"
    save_model(create_model("resnet8", num_classes=10, in_channels=3), teacher)
    cfg = load_config(None, [
        "student.arch=lenet5_half", "teacher.arch=resnet8", f"teacher.checkpoint={teacher}",
        "data.name=procedural", "data.train_samples=32", "data.test_samples=32", "data.num_workers=0",
        "loss.terms={kd: 1.0}", "train.epochs=1", "train.steps_per_epoch=2", "train.progress_bar=false",
        "train.log_every=1", "eval.batch_size=32", "source={name: pool, batch_size: 8, pool_size: 64}",
        f"synthesizer={synthesizer}", f"output_dir={tmp_path / 'run'}",
    ])
    summary = Trainer(cfg).fit()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["steps"] == 2 and summary["synth_s"] > 0 and on_disk["synth_s"] > 0


# --------------------------------------------------------------------------- helpers


def _spy_on_host_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every tensor-to-Python conversion made from this package's synthesis code.

    Such a conversion (``.item()``, ``bool(t)``, ...) makes the host wait for the
    device. Conversions inside torch itself (Adam reads its step counter, a CPU
    tensor) are not ours and are not recorded.
    """
    ours = (str(ROOT / "generators"), str(ROOT / "dfkd" / "sources" / "pool.py"))
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original: Callable = getattr(torch.Tensor, name)

        def spy(self: Tensor, *args, _original: Callable = original, _name: str = name):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(ours):
                calls.append(f"{_name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls
