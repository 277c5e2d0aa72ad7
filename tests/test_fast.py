"""Fast-DFKD meta-synthesis: the meta step against its closed form, the adaptation against plain updates,
the moving-average BN statistics, and the synthesizer in the engine."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from dfkd.errors import ConfigError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from generators.meta import FastMetaSynthesizer
from generators.networks import DCGANGenerator
from generators.synthesizers import eval_mode
from generators.terms import BNStatistics, Balance, OneHot, SynthBatch, Term

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 8, 4


class Constant(nn.Module):
    """A toy "generator": every code renders the same learnt image ``theta [C, S, S]``."""

    output_range: ClassVar[str] = "unit"
    nz = 2

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, z: Tensor) -> Tensor:
        return self.theta.expand(len(z), *self.theta.shape)


class Linear(Term):
    """``L = Σ a ⊙ mean_i x_i``: a constant gradient ``a`` with respect to the toy generator's image."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, batch: SynthBatch) -> Tensor:
        return (batch.x.mean(dim=0) * self.a).sum()


def identity(x: Tensor) -> Tensor:
    return x


class Flat(nn.Module):
    """A teacher for the toy problem: what it predicts does not enter the linear term."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(SIZE * SIZE, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def toy(meta: str, g_steps: int, lr: float = 0.01, meta_lr: float | None = None):
    theta = torch.linspace(-1, 1, SIZE * SIZE).view(1, SIZE, SIZE)
    a = torch.linspace(-3, 2, SIZE * SIZE).view(1, SIZE, SIZE) + 0.05  # mixed signs, none zero
    synth = FastMetaSynthesizer(
        Constant(theta), {"lin": Linear(a)}, identity, identity, CLASSES, (1, SIZE, SIZE), batch_size=3,
        g_steps=g_steps, lr=lr, lr_z=0.1, meta=meta, meta_lr=meta_lr, targets="argmax", view="none",
    )
    teacher = Flat().eval().requires_grad_(False)
    synth.attach(teacher)
    return synth, teacher, theta, a


def adam_step(g: Tensor, lr: float, eps: float = 1e-8) -> Tensor:
    """Adam's every step on a constant gradient ``g``: bias correction makes ``m̂ = g`` and ``v̂ = g²``."""
    return lr * g / (g.abs() + eps)


@pytest.mark.parametrize("g_steps", [1, 3])
def test_fomaml_meta_step_equals_its_closed_form_on_a_linear_toy(g_steps):
    synth, teacher, theta, a = toy("fomaml", g_steps, lr=0.01)
    synth.step(teacher, None, {"lin": 1.0})
    meta_grad = g_steps * a  # the clone's gradient is a at every update
    expected = theta - adam_step(meta_grad, lr=0.01 * g_steps)  # meta_lr defaults to lr · g_steps
    torch.testing.assert_close(synth.generator.theta.detach(), expected, rtol=0, atol=1e-6)


def test_reptile_meta_step_equals_its_closed_form_on_a_linear_toy():
    synth, teacher, theta, a = toy("reptile", g_steps=4, lr=0.01, meta_lr=0.5)
    current = synth.begin_round(torch.device("cpu"))
    with eval_mode(teacher):
        for _ in range(4):
            synth.update(current, teacher, None, {"lin": 1.0})
    adapted = theta - 4 * adam_step(a, lr=0.01)
    torch.testing.assert_close(current.network.theta.detach(), adapted, rtol=0, atol=1e-6)
    synth.finish_round(current)
    expected = theta - adam_step(theta - adapted, lr=0.5)  # the displacement θ - θ' is the meta-gradient
    torch.testing.assert_close(synth.generator.theta.detach(), expected, rtol=0, atol=1e-6)


def tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, CLASSES),
    )
    with torch.no_grad():
        net(torch.rand(16, 3, SIZE, SIZE) * 2)  # running statistics other than the defaults
    return net.eval().requires_grad_(False)


def fast(g_steps: int = 3, **options) -> tuple[FastMetaSynthesizer, nn.Module]:
    torch.manual_seed(1)
    generator = DCGANGenerator(image_size=SIZE, channels=3, nz=8, ngf=4)
    terms = {"bn": BNStatistics(momentum=options.pop("momentum", 0.0)), "oh": OneHot(), "balance": Balance()}
    synth = FastMetaSynthesizer(
        generator, terms, lambda x: (x - 0.5) / 0.25, lambda x: x * 0.25 + 0.5, CLASSES, (3, SIZE, SIZE),
        batch_size=6, g_steps=g_steps, lr=0.05, lr_z=0.2, targets="argmax", view="none", **options,
    )
    teacher = tiny_teacher()
    synth.attach(teacher)
    return synth, teacher


WEIGHTS = {"bn": 1.0, "oh": 0.5, "balance": 2.0}


def test_the_adapted_clone_equals_k_plain_adam_updates_of_the_generator_and_its_codes():
    k = 3
    synth, teacher = fast(g_steps=k)
    plain = copy.deepcopy(synth.generator)
    torch.manual_seed(7)
    current = synth.begin_round(torch.device("cpu"))
    with eval_mode(teacher):
        for _ in range(k):
            synth.update(current, teacher, None, WEIGHTS)

    torch.manual_seed(7)  # the same codes: z is the round's only draw (argmax targets draw nothing)
    z = torch.randn(6, plain.nz, requires_grad=True)
    optimizer = torch.optim.Adam([{"params": list(plain.parameters())}, {"params": [z], "lr": 0.2}], lr=0.05, betas=(0.5, 0.999))
    plain.train()
    for _ in range(k):
        x = (plain(z) - 0.5) / 0.25
        with synth.terms["bn"].capturing():
            batch = SynthBatch(x=x, teacher=teacher(x))
        loss = sum(weight * synth.terms[name](batch) for name, weight in WEIGHTS.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for (name, a), b in zip(current.network.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(current.variables[0], z, rtol=1e-5, atol=1e-6)


def test_a_meta_step_of_zero_leaves_the_meta_generator_unchanged_while_the_clone_moves():
    synth, teacher = fast(g_steps=2, meta_lr=0.0)
    before = {k: v.clone() for k, v in synth.generator.state_dict().items()}
    current = synth.begin_round(torch.device("cpu"))
    with eval_mode(teacher):
        for _ in range(2):
            synth.update(current, teacher, None, WEIGHTS)
    synth.finish_round(current)
    after = synth.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(current.network.project.weight, synth.generator.project.weight)
    assert synth.rounds == 1


def test_a_positive_meta_step_moves_the_meta_generator_and_each_round_clones_it_afresh():
    synth, teacher = fast(g_steps=2)
    before = synth.generator.project.weight.detach().clone()
    synth.step(teacher, None, WEIGHTS)
    assert not torch.equal(before, synth.generator.project.weight)
    current = synth.begin_round(torch.device("cpu"))
    assert torch.equal(current.network.project.weight, synth.generator.project.weight)
    assert current.network is not synth.generator


def test_the_first_layer_is_reset_once_at_its_round():
    synth, teacher = fast(g_steps=1, meta_lr=0.0, reset_first_layer_at=2)
    synth.step(teacher, None, WEIGHTS)
    kept = synth.generator.project.weight.detach().clone()
    synth.step(teacher, None, WEIGHTS)  # round 2 starts with the reset
    reset = synth.generator.project.weight.detach().clone()
    assert not torch.equal(kept, reset)
    assert reset.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.count_nonzero(synth.generator.project.bias) == 0
    assert synth.generator.stages[0].weight.abs().max().item() < 0.2  # N(0, 0.02²), as the code's reset_l0
    synth.step(teacher, None, WEIGHTS)
    assert torch.equal(reset, synth.generator.project.weight), "and never again"


def test_bn_momentum_blends_the_batch_statistics_with_the_average_of_earlier_rounds():
    teacher = tiny_teacher()
    bn_layer = teacher[1]
    term = BNStatistics(momentum=0.75)
    term.attach(teacher)

    def distance(x: Tensor) -> Tensor:
        with term.capturing():
            teacher(x)
        return term(SynthBatch(x=x, teacher=torch.zeros(1)))

    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        h = teacher[0](x)
        return h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)

    def gap(mean: Tensor, var: Tensor) -> Tensor:
        return (mean - bn_layer.running_mean).norm() + (var - bn_layer.running_var).norm()

    torch.manual_seed(3)
    first, second, third = (torch.randn(5, 3, SIZE, SIZE) for _ in range(3))
    torch.testing.assert_close(distance(first), gap(*moments(first)))  # no average yet: the batch alone
    term.end_round()
    (m1, v1), (m2, v2) = moments(first), moments(second)
    torch.testing.assert_close(distance(second), gap(0.25 * m2 + 0.75 * m1, 0.25 * v2 + 0.75 * v1))
    term.end_round()
    ema = (0.75 * m1 + 0.25 * m2, 0.75 * v1 + 0.25 * v2)
    m3, v3 = moments(third)
    torch.testing.assert_close(distance(third), gap(0.25 * m3 + 0.75 * ema[0], 0.25 * v3 + 0.75 * ema[1]))
    restored = BNStatistics(momentum=0.75)
    restored.load_state_dict(term.state_dict())
    assert all(torch.equal(a, b) for pair in zip(restored._ema, term._ema) for a, b in zip(*pair))


def test_bn_momentum_must_lie_in_zero_one():
    with pytest.raises(ValueError, match="momentum"):
        BNStatistics(momentum=1.0)


# --------------------------------------------------------------------------- in the engine

SHRINK = [
    "data.name=procedural", "data.test_samples=32", "data.num_workers=0", "eval.batch_size=32",
    "teacher.arch=resnet8", "student.arch=resnet8", "train.epochs=2", "train.steps_per_epoch=3",
    "train.progress_bar=false", "train.log_every=1", "source.batch_size=8", "source.rounds_every=3",
    "source.pool_size=64", "source.warmup_rounds=2", "synthesizer.generator={name: dcgan, nz: 16, ngf: 4}",
]


def test_fast_trains_a_student_from_its_pool_with_warmup_rounds_first(tmp_path, resnet8_teacher):
    cfg = load_config(ROOT / "recipes/methods/fast5.yaml", [
        f"output_dir={tmp_path / 'run'}", f"teacher.checkpoint={resnet8_teacher}", *SHRINK,
    ])
    trainer = Trainer(cfg)
    summary = trainer.fit()
    source = trainer.loop.source
    # two warm-up rounds, then a round at steps 0 and 3: four rounds of 8 kept images
    assert len(source.pool) == 32 and source.synthesizer.rounds == 4
    assert summary["steps"] == 6 and 0 <= summary["final_agree1"] <= 100
    ema = source.synthesizer.terms["bn"]._ema
    assert ema and all(torch.isfinite(mean).all() for mean, _ in ema), "the BN moving average is kept"
    assert (tmp_path / "run" / "generator.safetensors").is_file()


def test_fast_rejects_out_of_range_options_before_anything_runs():
    recipe = ROOT / "recipes/methods/fast2.yaml"
    for override, key in (("synthesizer.g_steps=0", "synthesizer.g_steps"), ("synthesizer.lr_z=0", "synthesizer.lr_z"),
                          ("synthesizer.meta=maml", "synthesizer.meta"), ("source.warmup_rounds=-1", "source.warmup_rounds")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(recipe, ["student.arch=resnet8", override])


def test_the_bn_term_on_a_teacher_without_batch_norm_is_a_clear_error(tmp_path):
    cfg = load_config(ROOT / "recipes/mnist/fast2/lenet5_lenet5_half.yaml", [
        f"output_dir={tmp_path / 'run'}", "data.name=procedural", "data.test_samples=32", "data.num_workers=0",
        "teacher.recipe=null", f"teacher.checkpoint={tmp_path / 'lenet5.safetensors'}", "synthesizer.terms.bn=1.0",
    ])
    from dfkd.weights import save_model
    from dfkd.models import create_model

    save_model(create_model("lenet5", num_classes=10, in_channels=3), tmp_path / "lenet5.safetensors", {"arch": "lenet5"})
    with pytest.raises(ConfigError, match=r"bn.*no(ne)?.*BatchNorm|BatchNorm.*none"):
        Trainer(cfg)
