"""Temperature policies: the GRL, the lambda curriculum, CTKD's tau, and the engine running them.

Expected numbers are worked out by hand from the formulas of the CTKD public
code (zhengli97/CTKD: ``models/temp_global.py``, ``train_student.py``
``CosineDecay``, ``helper/loops.py``), never produced by the code under test.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from dfkd.checkpoint import CheckpointManager
from dfkd.errors import ConfigError
from dfkd.losses import StudentLoss
from dfkd.models import create_model
from dfkd.policies.temperature import (
    GlobalTemperature,
    InstanceTemperature,
    TemperaturePolicy,
    ctkd_global,
    ctkd_instance,
    grad_reverse,
    grl_lambda,
)
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from dfkd.weights import save_model

ROOT = Path(__file__).resolve().parents[1]
CUDFKD_PROCEDURAL = ROOT / "recipes" / "procedural" / "cudfkd_resnet20_resnet8.yaml"
CTKD_RECIPES = sorted((ROOT / "recipes" / "cifar100").glob("ctkd*/*.yaml"))

SIGMOID_1 = 0.7310585786300049  # 1 / (1 + e^-1)
FIRST_TAU = 1.0 + 20.0 * SIGMOID_1  # 15.621171572600098: Global_T starts at theta = 1
LAMBDA_EPOCH_1 = (1.0 - 0.9510565162951535) / 2  # (1 - cos(pi/10)) / 2 = 0.024471741852423234

pytestmark = pytest.mark.usefixtures("one_thread")


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau) -> torch.Tensor:
    per_sample, _ = StudentLoss({"kd": 1.0})(student_logits, teacher_logits, None, tau)
    return per_sample.mean()


# ----------------------------------------------------------------------------- the reversal layer


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_grl_is_the_identity_forward_and_minus_lambda_backward(lam):
    x = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x.detach())
    y.backward(upstream)
    assert torch.allclose(x.grad, torch.tensor([-0.5 * lam, 1.5 * lam, -2.0 * lam], dtype=torch.float64), atol=0)


# ----------------------------------------------------------------------------- the lambda curriculum


def test_lambda_rises_by_half_a_cosine_then_stays():
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(5.0) == pytest.approx(0.5, abs=1e-15)  # (1 - cos(pi/2)) / 2
    assert grl_lambda(10.0) == 1.0
    assert grl_lambda(37.0) == 1.0
    assert grl_lambda(-3.0) == 0.0
    assert grl_lambda(1.0) == pytest.approx(LAMBDA_EPOCH_1, abs=1e-15)
    assert grl_lambda(2.0, lambda_min=0.2, lambda_max=0.8, loops=4.0) == pytest.approx(0.5, abs=1e-15)


def test_lambda_is_the_public_cosine_decay_with_the_sign_moved_into_the_grl():
    def cosine_decay(i, max_value=0.0, min_value=-1.0, num_loops=10):  # train_student.py, by hand
        i = min(max(i, 0), num_loops)
        return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value

    for epoch in range(0, 14):
        assert grl_lambda(float(epoch)) == pytest.approx(-cosine_decay(epoch), abs=1e-15)


def test_lambda_is_set_per_epoch_counting_epochs_from_one_as_the_public_loop():
    policy = ctkd_global(4.0, 10)
    # the public loop runs epoch 1 at get_value(1): our progress [0, 1) is its epoch 1
    assert policy.lambda_at(0.0) == policy.lambda_at(0.99) == pytest.approx(LAMBDA_EPOCH_1, abs=1e-15)
    assert policy.lambda_at(4.5) == pytest.approx(0.5, abs=1e-15)  # epoch 5 of 10
    assert policy.lambda_at(9.0) == policy.lambda_at(100.0) == 1.0


# ----------------------------------------------------------------------------- tau


def test_the_first_global_tau_is_the_public_codes():
    tau, scalars = ctkd_global(4.0, 10)(torch.zeros(2, 10), torch.zeros(2, 10), 0.0, 10)
    assert tau.shape == (1,)
    assert tau.item() == pytest.approx(FIRST_TAU, rel=1e-6)
    assert scalars["temperature/tau"].dim() == 0 and scalars["temperature/tau"].item() == pytest.approx(FIRST_TAU, rel=1e-6)
    assert scalars["temperature/grl_lambda"].item() == pytest.approx(LAMBDA_EPOCH_1, rel=1e-6)


@pytest.mark.parametrize("theta", [-1e4, -30.0, 0.0, 30.0, 1e4])
def test_global_tau_stays_in_range_for_extreme_theta(theta):
    module = GlobalTemperature(t_min=1.0, t_range=20.0, theta_init=theta)
    tau = module(torch.zeros(1, 3), torch.zeros(1, 3), 1.0)
    assert torch.isfinite(tau).all() and 1.0 <= tau.item() <= 21.0
    if abs(theta) == 1e4:
        assert tau.item() == (21.0 if theta > 0 else 1.0)


def test_instance_tau_is_per_sample_and_stays_in_range():
    torch.manual_seed(0)
    module = InstanceTemperature(7, hidden=32, t_min=2.0, t_range=5.0)
    for scale in (1.0, 1e2, 1e4):
        tau = module(scale * torch.randn(64, 7), scale * torch.randn(64, 7), 1.0)
        assert tau.shape == (64, 1)
        assert torch.isfinite(tau).all() and (tau >= 2.0).all() and (tau <= 7.0).all()
    assert tau.std() > 0, "different samples get different temperatures"


def test_fixed_gives_loss_temperature_or_its_own_value():
    from dfkd.policies.temperature import fixed

    assert fixed(4.0, 10)(None, None, 0.0, 1) == (4.0, {})
    assert fixed(4.0, 10, value=2.5)(None, None, 0.0, 1) == (2.5, {})
    assert fixed(4.0, 10).parameters() == [] and fixed(4.0, 10).module is None


def test_bad_ranges_are_config_errors():
    for options in ({"t_min": 0.0}, {"t_range": -1.0}, {"loops": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(options))):
            ctkd_global(4.0, 10, **options)
    with pytest.raises(ConfigError, match="hidden"):
        ctkd_instance(4.0, 10, hidden=0)


# ----------------------------------------------------------------------------- the min-max step


def _tiny_problem():
    torch.manual_seed(0)
    return nn.Linear(6, 5), torch.randn(16, 6), 3.0 * torch.randn(16, 5)


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_theta_receives_minus_lambda_times_the_kd_gradient(lam):
    student, x, teacher = _tiny_problem()
    policy = ctkd_global(4.0, 5, lambda_max=lam, loops=1.0)  # lambda_max from the first epoch on
    tau, _ = policy(student(x), teacher, 0.0, 1)
    _kd(student(x), teacher, tau).backward()

    theta = torch.ones(1, requires_grad=True)  # the same loss, no reversal, by hand
    _kd(student(x).detach(), teacher, 1.0 + 20.0 * torch.sigmoid(theta)).backward()
    assert theta.grad.abs().item() > 0
    assert torch.allclose(policy.module.theta.grad, -lam * theta.grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("make", [lambda: ctkd_global(4.0, 5, loops=1.0), lambda: ctkd_instance(4.0, 5, hidden=16, loops=1.0)],
                         ids=["global", "instance"])
def test_one_step_moves_the_temperature_up_the_kd_loss_and_the_student_down_it(make):
    student, x, teacher = _tiny_problem()
    policy: TemperaturePolicy = make()
    student_before, module_before = copy.deepcopy(student), copy.deepcopy(policy.module)
    # a larger step for the temperature: dKD/dtau is small at tau = 15.6, and float32 must see the change
    optimizer = torch.optim.SGD([{"params": student.parameters()}, {"params": policy.parameters(), "lr": 1.0}], lr=0.01)
    tau, scalars = policy(student(x), teacher, 0.0, 1)
    assert scalars["temperature/grl_lambda"].item() == 1.0
    _kd(student(x), teacher, tau).backward()
    optimizer.step()

    with torch.no_grad():
        s0, s1 = student_before(x), student(x)
        tau0, tau1 = module_before(s0, teacher, 1.0), policy.module(s0, teacher, 1.0)
        base = _kd(s0, teacher, tau0)
        assert _kd(s0, teacher, tau1) > base, "the temperature ascends the KD loss"
        assert _kd(s1, teacher, tau0) < base, "the student descends it"


def test_the_instance_mlp_passes_no_gradient_into_the_student():
    student, x, teacher = _tiny_problem()
    policy = ctkd_instance(4.0, 5, hidden=16, loops=1.0)
    tau, _ = policy(student(x), teacher, 0.0, 1)
    _kd(student(x), teacher, tau).backward()
    through_policy = student.weight.grad.clone()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())

    student.zero_grad()
    _kd(student(x), teacher, tau.detach()).backward()
    assert torch.equal(student.weight.grad, through_policy)


# ----------------------------------------------------------------------------- the engine

TINY = [
    "student.arch=lenet5_half",
    "data.name=procedural",
    "data.train_samples=128",
    "data.test_samples=64",
    "data.num_workers=0",
    "source.batch_size=32",
    "optim.lr=0.05",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.log_every=1",
    "train.progress_bar=false",
    "eval.batch_size=64",
]


def _random_teacher(path: Path, arch: str) -> Path:
    torch.manual_seed(1)
    save_model(create_model(arch, num_classes=10), path, {"arch": arch})
    return path


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    return _random_teacher(tmp_path / "teacher.safetensors", "lenet5_half")


@pytest.fixture
def resnet8_teacher(tmp_path: Path) -> Path:
    return _random_teacher(tmp_path / "resnet8.safetensors", "resnet8")


def _real_kd(run: Path, teacher: Path, *extra: str):
    return load_config(None, [
        *TINY, f"output_dir={run}", "teacher.arch=lenet5_half", f"teacher.checkpoint={teacher}",
        "loss.terms={ce: 0.1, kd: 0.9}", *extra,
    ])


def _data_free(run: Path, teacher: Path, *extra: str):
    return load_config(CUDFKD_PROCEDURAL, [
        f"output_dir={run}", "teacher.arch=resnet8", f"teacher.checkpoint={teacher}", "teacher.recipe=null",
        "data.test_samples=40", "data.num_workers=0", "source.batch_size=8", "train.epochs=1",
        "train.steps_per_epoch=2", "train.log_every=1", "train.progress_bar=false", "eval.batch_size=40",
        "loss.terms={kd: 1.0}", "weighting={name: uniform}", *extra,
    ])


def _scalars(run: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("policy", ["ctkd_global", "ctkd_instance"])
@pytest.mark.parametrize("source", ["real", "generator"])
def test_the_engine_learns_the_temperature(policy, source, tmp_path, teacher, resnet8_teacher):
    run = tmp_path / "run"
    options = [f"temperature.name={policy}", "temperature.loops=1"]  # lambda = 1 from the first step
    cfg = _real_kd(run, teacher, *options) if source == "real" else _data_free(run, resnet8_teacher, *options)
    trainer = Trainer(cfg)
    assert trainer.cfg.source.name == source
    assert len(trainer.loop.optimizer.param_groups) == 2, "the temperature trains in the student's optimiser"
    before = {k: v.clone() for k, v in trainer.loop.temperature.module.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 2

    after = load_file(run / "temperature.safetensors")
    assert sorted(after) == sorted(before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the temperature module was updated"
    scalars = _scalars(run)
    assert all(1.0 <= v <= 21.0 for v in scalars["temperature/tau"]) and len(scalars["temperature/tau"]) >= 2
    assert scalars["temperature/grl_lambda"][0] == 1.0
    if policy == "ctkd_global":
        assert scalars["temperature/tau"][0] == pytest.approx(FIRST_TAU, rel=1e-6)


@pytest.mark.parametrize("extra, temperature", [
    ([], 4.0), (["temperature={name: fixed, value: 2.0}"], 2.0), (["loss.temperature=3.0"], 3.0),
], ids=["default", "value", "loss.temperature"])
def test_the_fixed_policy_passes_exactly_the_configured_temperature(extra, temperature, tmp_path, teacher):
    trainer = Trainer(_real_kd(tmp_path / "run", teacher, *extra))
    assert trainer.cfg.temperature.name == "fixed" and trainer.loop.temperature.module is None
    assert len(trainer.loop.optimizer.param_groups) == 1
    ctx = trainer.loop.context(0)
    trainer.loop.source.on_epoch_start(ctx)
    batch = trainer.loop.source.next_batch(ctx)
    student = copy.deepcopy(trainer.loop.unwrapped_student)
    terms = trainer.loop.train_step(batch)
    assert not [k for k in terms if k.startswith("temperature/")]
    with torch.no_grad():
        x = batch.x.contiguous(memory_format=trainer.loop.memory_format)
        per_sample, _ = trainer.loop.loss(student(x), trainer.loop.teacher(x), batch.y, temperature)
    assert torch.equal(terms["loss"], per_sample.mean()), "bit for bit the loss at the configured temperature"


def test_a_default_run_matches_an_explicit_fixed_one_bit_for_bit(tmp_path, teacher):
    Trainer(_real_kd(tmp_path / "a", teacher)).fit()
    Trainer(_real_kd(tmp_path / "b", teacher, "temperature={name: fixed, value: 4.0}")).fit()
    a, b = load_file(tmp_path / "a" / "student.safetensors"), load_file(tmp_path / "b" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "a" / "temperature.safetensors").exists()


def test_resume_restores_theta_exactly(tmp_path, teacher, crash_after_checkpoint):
    options = ["train.epochs=2", "temperature.name=ctkd_global", "temperature.loops=2"]
    Trainer(_real_kd(tmp_path / "straight", teacher, *options)).fit()
    crash_after_checkpoint(_real_kd(tmp_path / "crashy", teacher, *options), epoch=1)

    models, _, _ = CheckpointManager.load(CheckpointManager(tmp_path / "crashy" / "checkpoints").latest())
    saved_theta = models["temperature"]["theta"]
    assert saved_theta.item() != 1.0, "the checkpoint holds the theta learnt in epoch 1"
    resumed = Trainer(_real_kd(tmp_path / "crashy", teacher, *options, "train.resume=auto"))
    resumed._resume()
    assert torch.equal(resumed.loop.temperature.module.theta.detach(), saved_theta)

    Trainer(_real_kd(tmp_path / "crashy", teacher, *options, "train.resume=auto")).fit()
    straight = load_file(tmp_path / "straight" / "temperature.safetensors")["theta"]
    assert torch.equal(load_file(tmp_path / "crashy" / "temperature.safetensors")["theta"], straight)


def test_a_learnt_temperature_needs_a_kd_term(tmp_path, teacher):
    with pytest.raises(ConfigError, match="has no kd"):
        Trainer(load_config(None, [
            *TINY, f"output_dir={tmp_path / 'run'}", "teacher.arch=lenet5_half", f"teacher.checkpoint={teacher}",
            "loss.terms={l1: 1.0}", "temperature.name=ctkd_global",
        ]))


def test_a_misspelt_option_names_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="temperature.t_range"):
        load_config(None, [*TINY, "temperature.name=ctkd_global", "temperature.t_rnage=5"])
    with pytest.raises(ConfigError, match="ctkd_global"):
        load_config(None, [*TINY, "temperature.name=ctkd_globl"])


# ----------------------------------------------------------------------------- the recipes


@pytest.mark.parametrize("recipe", CTKD_RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_ctkd_recipes_follow_the_layout_and_run_two_steps(recipe, tmp_path, resnet8_teacher):
    cfg = load_config(recipe)
    method, pair = recipe.parent.name, recipe.stem
    assert cfg.temperature.name == {"ctkd": "ctkd_global", "ctkd_instance": "ctkd_instance"}[method]
    assert pair == f"{cfg.teacher.arch}_{cfg.student.arch}" and cfg.output_dir == f"runs/cifar100/{method}/{pair}"
    assert (ROOT / cfg.teacher.recipe).is_file()
    assert dict(cfg.loss.terms) == {"ce": 0.1, "kd": 0.9} and cfg.source.name == "real"
    assert "\nbase: ../../methods/ctkd.yaml" in recipe.read_text()

    run = tmp_path / "run"
    small = load_config(recipe, [
        f"output_dir={run}", "data.name=procedural", "data.train_samples=64", "data.test_samples=32",
        "data.num_workers=0", "teacher.arch=resnet8", f"teacher.checkpoint={resnet8_teacher}", "teacher.recipe=null",
        "student.arch=resnet8", "source.batch_size=16", "train.epochs=1", "train.steps_per_epoch=2",
        "train.log_every=1", "train.progress_bar=false", "eval.batch_size=32",
    ])
    assert Trainer(small).fit()["steps"] == 2
    assert (run / "temperature.safetensors").is_file()
    assert "temperature/tau" in _scalars(run)
