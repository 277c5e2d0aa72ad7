"""Real-data curricula: class balance, each method's stage rule, the scoring pass, and the loop end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from dfkd.curricula import CURRICULA, DCD, SLKD, TC3KD, Scorer, Scores, easiest_per_class, window_per_class
from dfkd.data import TensorImageDataset
from dfkd.data.transforms import Normalize, to_unit
from dfkd.errors import ConfigError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from generators.divergences import kl_div

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 7
COUNTS = [400, 200, 100, 50, 25, 13, 7]  # deliberately imbalanced: 795 samples


def _imbalanced_targets() -> Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


class FakeScorer:
    """Hands out preset logits, as the scoring pass would; records what it was asked to score."""

    def __init__(self, targets: Tensor, seed: int = 0) -> None:
        self.targets = targets
        gen = torch.Generator().manual_seed(seed)
        self.teacher = torch.randn(len(targets), NUM_CLASSES, generator=gen) * 3
        self.student = torch.randn(len(targets), NUM_CLASSES, generator=gen) * 3
        self.calls: list[tuple[Tensor, bool, bool]] = []

    def __call__(self, index: Tensor, student=None, *, teacher: bool = True) -> Scores:
        self.calls.append((index.clone(), student is not None, teacher))
        return Scores(
            index=index, labels=self.targets[index],
            teacher=self.teacher[index] if teacher else None,
            student=self.student[index] if student is not None else None,
        )

    def reshuffle_student(self, seed: int) -> None:
        """A new snapshot: the student's logits move between stages."""
        self.student = torch.randn(len(self.targets), NUM_CLASSES, generator=torch.Generator().manual_seed(seed)) * 3


STUDENT = object()  # stands for the student module; the fake scorer only checks that one is given


def _run(curriculum, targets: Tensor, epochs: int, scorer: FakeScorer | None = None) -> tuple[Tensor, list]:
    """Drive a curriculum through ``epochs`` epochs; returns its pool and ``[(epoch, selection)]``."""
    scorer = scorer or FakeScorer(targets)
    pool = curriculum.setup(torch.arange(len(targets)), targets, seed=0)
    decisions = []
    for epoch in range(epochs):
        scorer.reshuffle_student(100 + epoch)
        decisions.append((epoch, curriculum.select(epoch, epochs, scorer, STUDENT)))
    return pool, decisions


ALL = {
    "uniform": {},
    "mekd": {},
    "slkd": {"warmup": 0.2, "phases": 4},
    "tc3kd": {"stages": 4},
    "dcd": {"full_by": 0.8},
}


# --------------------------------------------------------------------------- class balance


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_selection_keeps_each_class_share_on_an_imbalanced_dataset(name):
    targets = _imbalanced_targets()
    curriculum = CURRICULA.get(name)(**ALL[name])
    pool, decisions = _run(curriculum, targets, epochs=10)
    pool_counts = torch.bincount(targets[pool], minlength=NUM_CLASSES).double()
    selections = [s for _, s in decisions if s is not None and s.index is not None]
    assert selections, "the curriculum selected something"
    sizes = set()
    for selection in selections:
        assert torch.isin(selection.index, pool).all(), "selections come from the training pool"
        assert len(selection.index.unique()) == len(selection.index)
        counts = torch.bincount(targets[selection.index], minlength=NUM_CLASSES).double()
        expected = pool_counts * len(selection.index) / len(pool)
        assert (counts - expected).abs().max() <= 1.0, f"class counts {counts.tolist()} vs shares {expected.tolist()}"
        assert (counts > 0).all(), "no class ever goes missing"
        sizes.add(len(selection.index))
    assert max(sizes) == len(pool), "every curriculum ends on the whole training pool"
    if name != "uniform":
        assert min(sizes) < len(pool), "and starts on a subset"


def test_within_class_selection_is_by_rank_not_by_value():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    difficulty = torch.tensor([0.1, 0.4, 0.2, 0.3, 10.0, 40.0, 30.0, 20.0])  # class 1 is harder in value only
    assert easiest_per_class(difficulty, labels, 0.5).tolist() == [0, 2, 4, 7]
    assert window_per_class(difficulty, labels, 0.5, 1.0).tolist() == [1, 3, 5, 6]


# --------------------------------------------------------------------------- each method's rule


def test_slkd_phase_k_holds_exactly_the_easiest_k_of_n_of_each_class_by_snapshot_confidence():
    targets = _imbalanced_targets()
    scorer = FakeScorer(targets)
    slkd = SLKD(warmup=0.2, phases=4)
    pool = slkd.setup(torch.arange(len(targets)), targets, seed=0)
    epochs, seen_phases = 10, set()
    for epoch in range(epochs):
        scorer.reshuffle_student(100 + epoch)
        snapshot = scorer.student.clone()
        selection = slkd.select(epoch, epochs, scorer, STUDENT)
        if selection is None:
            continue
        phase = selection.stage
        seen_phases.add(phase)
        if phase == 0:
            assert epoch == 0 and torch.equal(selection.index, pool), "the warm-up trains on everything"
            continue
        confidence = snapshot.softmax(-1).gather(1, targets[:, None]).squeeze(1)
        expected = []
        for c, n in enumerate(COUNTS):
            members = (targets == c).nonzero(as_tuple=True)[0]
            ranked = members[confidence[members].argsort(descending=True)]
            expected.append(ranked[: int(n * phase / 4 + 0.5)])
        assert torch.equal(selection.index.sort().values, torch.cat(expected).sort().values), f"phase {phase}"
    assert seen_phases == {0, 1, 2, 3, 4}


def test_tc3kd_subsets_are_nested_stages_disjoint_and_the_last_is_everything():
    targets = _imbalanced_targets()
    scorer = FakeScorer(targets)
    tc3kd = TC3KD(stages=4)
    pool, decisions = _run(tc3kd, targets, epochs=8, scorer=scorer)
    subsets = [set(s.index.tolist()) for _, s in decisions if s is not None]
    assert len(subsets) == 4
    assert all(a < b for a, b in zip(subsets, subsets[1:])), "S_1 ⊂ S_2 ⊂ ... strictly"
    added = [subsets[0]] + [b - a for a, b in zip(subsets, subsets[1:])]
    assert sum(len(a) for a in added) == len(set().union(*added)), "each stage adds samples no other stage adds"
    assert subsets[-1] == set(pool.tolist())
    for k, subset in enumerate(subsets, start=1):
        counts = torch.bincount(targets[list(subset)], minlength=NUM_CLASSES)
        assert counts.tolist() == [int(n * k / 4 + 0.5) for n in COUNTS], f"N/(c·m) per class at stage {k}"


def test_tc3kd_ranks_only_the_residual_set_with_a_decreasing_teacher_weight():
    targets = _imbalanced_targets()
    scorer = FakeScorer(targets)
    tc3kd = TC3KD(stages=4)
    tc3kd.setup(torch.arange(len(targets)), targets, seed=0)
    first = tc3kd.select(0, 4, scorer, STUDENT)
    assert scorer.calls[-1][1] is False, "stage 1 (alpha = 1) needs no student forward pass"
    scorer.reshuffle_student(7)
    second = tc3kd.select(1, 4, scorer, STUDENT)
    scored = scorer.calls[-1][0]
    assert set(scored.tolist()) == set(range(len(targets))) - set(first.index.tolist()), "D - S_1 only"
    alpha = 1 - 1 / 4
    g = alpha * F.cross_entropy(scorer.teacher[scored], targets[scored], reduction="none") + (1 - alpha) * F.cross_entropy(
        scorer.student[scored], targets[scored], reduction="none"
    )
    top = set()
    for c, n in enumerate(COUNTS):  # stage 2 brings class c from round(n/4) to round(2n/4) samples
        members = (targets[scored] == c).nonzero(as_tuple=True)[0]
        need = int(2 * n / 4 + 0.5) - int(n / 4 + 0.5)
        top |= set(scored[members[g[members].argsort()[:need]]].tolist())
    assert set(second.index.tolist()) - set(first.index.tolist()) == top
    assert [tc3kd.alpha(k) for k in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    assert TC3KD(stages=4, alpha="increasing").alpha(1) == 0.25 and TC3KD(stages=4, alpha="fixed").alpha(3) == 0.5


class ScriptedValScorer(FakeScorer):
    """The student's accuracy on the held-out split follows a script, one value per call on it."""

    def __init__(self, targets: Tensor, accuracies: list[float]) -> None:
        super().__init__(targets)
        self.accuracies = list(accuracies)
        self.val: Tensor | None = None

    def __call__(self, index, student=None, *, teacher=True):
        if self.val is not None and torch.equal(index, self.val):
            accuracy = self.accuracies.pop(0)
            correct = torch.arange(len(index)) < round(accuracy * len(index))
            labels = self.targets[index]
            predicted = torch.where(correct, labels, (labels + 1) % NUM_CLASSES)
            self.student[index] = F.one_hot(predicted, NUM_CLASSES).float() * 10
            self.teacher[index] = F.one_hot(labels, NUM_CLASSES).float() * 10
        return super().__call__(index, student, teacher=teacher)


def test_dcd_window_holds_while_the_gain_is_at_least_s_and_advances_the_more_the_smaller_the_gain():
    targets = torch.arange(2000) % NUM_CLASSES
    script = [0.30, 0.40, 0.50, 0.50, 0.50, 0.505, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60]
    scorer = ScriptedValScorer(targets, script)
    dcd = DCD(s=0.01, start=0.3, step=0.2, val_fraction=0.1, full_by=None)
    pool = dcd.setup(torch.arange(len(targets)), targets, seed=0)
    scorer.val = dcd.val
    assert len(dcd.val) == 200 and not torch.isin(dcd.val, pool).any(), "Val is held out of the training pool"
    highs, reselected = [], []
    for epoch in range(len(script)):
        selection = dcd.select(epoch, 100, scorer, STUDENT)
        highs.append(round(dcd.high, 6))
        reselected.append(selection.index is not None)
    move_no_gain = 0.2 * 0.01 / (0.01 + 0.0)
    move_small_gain = 0.2 * 0.01 / (0.01 + 0.005)
    expected = [0.3, 0.3, 0.3, 0.3, 0.3 + move_no_gain, 0.5 + move_small_gain]
    assert highs[:6] == pytest.approx(expected)
    assert reselected[:6] == [True, False, False, True, True, True], "hold, hold, re-score (same window), move, move"
    assert move_no_gain > move_small_gain, "the smaller the gain, the larger the move"
    assert highs[6] == highs[5] and not reselected[6], "a gain >= s holds the window again"
    assert highs[-1] == 1.0, "the window ends covering everything"
    assert reselected[-1] and dcd.stage > 0


def test_dcd_difficulty_weights_follow_the_validation_accuracies():
    targets = torch.arange(700) % NUM_CLASSES
    scorer = ScriptedValScorer(targets, [0.5])
    dcd = DCD(val_fraction=0.1)
    dcd.setup(torch.arange(len(targets)), targets, seed=0)
    scorer.val = dcd.val
    selection = dcd.select(0, 10, scorer, STUDENT)
    w_ce, w_kd = 0.5 - 1 / NUM_CLASSES, 1.0 - 0.5  # Val_t is 1 in this script
    assert selection.scalars["curriculum/w_ce"] == pytest.approx(w_ce)
    assert selection.scalars["curriculum/w_kd"] == pytest.approx(w_kd)
    train = dcd.pool
    phi = w_ce * F.cross_entropy(scorer.student[train], targets[train], reduction="none") + w_kd * kl_div(
        scorer.teacher[train], scorer.student[train]
    )
    assert torch.allclose(selection.difficulty, phi)


def test_dcd_floor_covers_everything_by_full_by_even_when_the_student_keeps_improving():
    targets = torch.arange(700) % NUM_CLASSES
    scorer = ScriptedValScorer(targets, [0.1 * k for k in range(10)])  # a large gain every epoch
    dcd = DCD(full_by=0.5, val_fraction=0.1)
    dcd.setup(torch.arange(len(targets)), targets, seed=0)
    scorer.val = dcd.val
    highs = []
    for epoch in range(10):
        dcd.select(epoch, 10, scorer, STUDENT)
        highs.append(dcd.high)
    assert highs[0] == pytest.approx(1 / 3) and highs[5] == 1.0 and highs == sorted(highs)


def test_mekd_re_ranks_with_the_current_snapshot_at_each_stage():
    targets = _imbalanced_targets()
    scorer = FakeScorer(targets)
    pool, decisions = _run(CURRICULA.get("mekd")(), targets, epochs=9, scorer=scorer)
    stages = [(e, s) for e, s in decisions if s is not None]
    assert [e for e, _ in stages] == [0, 3, 6]
    fractions = [len(s.index) / len(pool) for _, s in stages]
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0], abs=0.01)
    student_calls = [c for c in scorer.calls if c[1]]
    assert len(student_calls) == 2, "a fresh snapshot scores stages 1 and 2; stage 3 needs no scores"


# --------------------------------------------------------------------------- the scoring pass


class Counting(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(NUM_CLASSES))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.net(x)


def test_the_scoring_pass_matches_per_sample_losses_computed_one_at_a_time():
    from accelerate import Accelerator

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (37,), generator=gen)
    dataset = TensorImageDataset(images, targets, tuple(str(k) for k in range(NUM_CLASSES)))
    normalize = Normalize([0.5] * 3, [0.25] * 3)
    teacher, student = Counting(1), Counting(2)
    teacher(torch.zeros(1, 3, 8, 8)), student(torch.zeros(1, 3, 8, 8))  # materialise the lazy layers
    teacher.eval(), student.train()
    teacher.seen = student.seen = 0
    scorer = Scorer(dataset, normalize, Accelerator(cpu=True), teacher, batch_size=5)
    index = torch.tensor([3, 0, 36, 17, 17, 8])
    scores = scorer(index, student)
    assert student.training, "the student is scored in eval mode and handed back in train mode"

    student.eval()
    with torch.no_grad():
        for row, i in enumerate(index.tolist()):
            x = normalize(to_unit(images[i : i + 1]))
            t, s, y = teacher(x), student(x), targets[i : i + 1]
            assert scores.teacher_ce()[row] == pytest.approx(float(F.cross_entropy(t, y)), abs=1e-5)
            assert scores.student_ce()[row] == pytest.approx(float(F.cross_entropy(s, y)), abs=1e-5)
            assert scores.kl(2.0)[row] == pytest.approx(float(kl_div(t, s, 2.0)[0]), abs=1e-5)
            assert scores.confidence()[row] == pytest.approx(float(s.softmax(-1)[0, y[0]]), abs=1e-6)


def test_the_scoring_pass_costs_one_forward_per_model_per_sample_and_caches_the_teacher():
    from accelerate import Accelerator

    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    targets = torch.arange(50) % NUM_CLASSES
    dataset = TensorImageDataset(images, targets, tuple(str(k) for k in range(NUM_CLASSES)))
    teacher, student = Counting(1), Counting(2)
    teacher(torch.zeros(1, 3, 8, 8)), student(torch.zeros(1, 3, 8, 8))
    teacher.seen = student.seen = 0
    scorer = Scorer(dataset, Normalize([0.5] * 3, [0.25] * 3), Accelerator(cpu=True), teacher, batch_size=16)
    everything = torch.arange(50)
    scorer(everything, student)
    assert (teacher.seen, student.seen) == (50, 50)
    scorer(everything, student)
    assert (teacher.seen, student.seen) == (50, 100), "the teacher's logits are cached; the snapshot is re-run"
    scorer(everything[:10], None, teacher=False)
    assert (teacher.seen, student.seen) == (50, 100)


# --------------------------------------------------------------------------- the loop end to end

TINY = [
    "student.arch=lenet5_half", "data.name=procedural", "data.train_samples=420", "data.test_samples=70",
    "data.num_workers=0", "source.batch_size=35", "optim.lr=0.05", "train.log_every=2", "train.progress_bar=false",
    "eval.batch_size=70",
]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    Trainer(load_config(None, [*TINY, f"output_dir={out}", "train.epochs=1"])).fit()
    return out / "student.safetensors"


def _kd_cfg(out: Path, teacher: Path, curriculum: str, *extra: str):
    return load_config(None, [
        *TINY, f"output_dir={out}", "train.epochs=4", "teacher.arch=lenet5_half", f"teacher.checkpoint={teacher}",
        "loss.terms={ce: 0.1, kd: 0.9}", f"source.curriculum={{name: {curriculum}}}", *extra,
    ])


def test_a_dcd_run_logs_its_curriculum_to_tensorboard(tmp_path, tiny_teacher):
    trainer = Trainer(_kd_cfg(tmp_path / "run", tiny_teacher, "dcd"))
    assert trainer.loop.steps_per_epoch == 378 // 35, "an epoch is one pass of the training pool (Val held out)"
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("active_size", "active_fraction", "stage", "class_share_min", "class_share_max", "window_high",
                "val_student", "gain"):
        assert f"curriculum/{tag}" in scalars, tag
    assert {"curriculum/difficulty", "curriculum/class_share"} <= set(events.Tags()["histograms"])
    first = events.Scalars("curriculum/active_fraction")[0].value
    assert 0.3 <= first <= 0.4, "DCD starts on the easiest third of each class"
    for tag in ("curriculum/class_share_min", "curriculum/class_share_max"):  # ~38 per class: rounding only
        assert all(abs(e.value - 1.0) < 0.1 for e in events.Scalars(tag)), tag


def test_a_curriculum_run_resumes_exactly(tmp_path, tiny_teacher, crash_after_checkpoint):
    straight = Trainer(_kd_cfg(tmp_path / "straight", tiny_teacher, "tc3kd", "source.curriculum.stages=4")).fit()
    crash_after_checkpoint(_kd_cfg(tmp_path / "crashy", tiny_teacher, "tc3kd", "source.curriculum.stages=4"), epoch=2)
    resumed = Trainer(_kd_cfg(tmp_path / "crashy", tiny_teacher, "tc3kd", "source.curriculum.stages=4", "train.resume=auto"))
    summary = resumed.fit()
    assert summary["final_acc1"] == straight["final_acc1"]
    a, b = load_file(tmp_path / "straight" / "student.safetensors"), load_file(tmp_path / "crashy" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ends with the same weights"
    assert len(resumed.loop.source.active) == len(resumed.loop.source.pool)


def test_curriculum_options_are_checked_with_the_recipe():
    with pytest.raises(ConfigError, match="source.curriculum.stages"):
        load_config(None, ["teacher.arch=lenet5", "student.arch=lenet5_half", "source.curriculum={name: tc3kd, stage: 3}"])
    with pytest.raises(ConfigError, match="mekd"):
        load_config(None, ["teacher.arch=lenet5", "student.arch=lenet5_half", "source.curriculum={name: mekdd}"])


def test_a_curriculum_that_scores_with_the_teacher_needs_one(tmp_path):
    with pytest.raises(ConfigError, match="teacher"):
        Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", "source.curriculum={name: dcd}"]))


# --------------------------------------------------------------------------- every real-data recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
REAL_DATA_METHODS = ("kd", "mekd", "dcd", "slkd", "tc3kd", "ctkd", "ctkd_instance")
PAIR_RECIPES = sorted(p for fam in ("cifar10", "cifar100") for m in REAL_DATA_METHODS for p in (RECIPES / fam / m).glob("*.yaml"))
CPU_RECIPES = sorted(
    p for p in (RECIPES / "cifar10_jpeg").glob("*.yaml")
    if p.name.startswith("scratch_") or p.name.rsplit("_resnet56a", 1)[0] in REAL_DATA_METHODS
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, Path]:
    """Tiny train and test splits in the real on-disk formats: CIFAR pickles and a JPEG class tree."""
    from test_data import CIFAR10_CLASSES, cifar_data, write_class_tree, write_pickle

    root = tmp_path_factory.mktemp("splits")
    labels = [k % 10 for k in range(40)]
    folder = root / "cifar10" / "cifar-10-batches-py"
    for i in range(5):
        write_pickle(folder / f"data_batch_{i + 1}", {"labels": labels[8 * i : 8 * i + 8], "data": cifar_data(labels[8 * i : 8 * i + 8])})
    write_pickle(folder / "test_batch", {"labels": labels[:20], "data": cifar_data(labels[:20])})
    fine = [(5 * k + 4) % 100 for k in range(40)]
    for split in ("train", "test"):
        write_pickle(root / "cifar100" / "cifar-100-python" / split, {"fine_labels": fine, "data": cifar_data(fine)})
    write_class_tree(root / "cifar10_jpeg" / "train", CIFAR10_CLASSES, per_class=4, ext=".jpg")
    write_class_tree(root / "cifar10_jpeg" / "test", CIFAR10_CLASSES, per_class=2, ext=".jpg")
    return {name: root / name for name in ("cifar10", "cifar100", "cifar10_jpeg")}


def test_every_real_data_method_has_its_recipes():
    names = {(p.parent.parent.name, p.parent.name) for p in PAIR_RECIPES}
    assert {m for f, m in names if f == "cifar10"} == {"kd", "mekd", "dcd", "slkd"}
    assert {m for f, m in names if f == "cifar100"} == set(REAL_DATA_METHODS)
    assert len(CPU_RECIPES) == 8


@pytest.mark.parametrize("recipe", PAIR_RECIPES + CPU_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_real_data_recipe_runs_two_steps(recipe: Path, splits, tmp_path):
    cfg = load_config(recipe)
    assert cfg.source.name == "real" and cfg.synthesizer is None
    cfg = load_config(recipe, [
        f"output_dir={tmp_path / 'run'}", f"data.root={splits[cfg.data.name]}", "data.num_workers=0",
        "teacher.checkpoint=null", "teacher.recipe=null", "teacher.arch=resnet8", "student.arch=resnet8",
        "train.epochs=1", "train.steps_per_epoch=2", "train.log_every=1", "train.progress_bar=false",
        "source.batch_size=8", "eval.batch_size=64",
    ])
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 2
    assert all(math.isfinite(summary[k]) for k in ("final_acc1", "final_agree1", "final_loyalty"))
