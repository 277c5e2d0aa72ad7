"""Every method recipe runs two real steps on tiny models and writes summary.json.

The recipes under ``recipes/{mnist,cifar10,cifar100}/<method>/`` and ``recipes/cifar10_jpeg/``
are run as written, with overrides that only shrink them: tiny datasets in the recipe's real
on-disk format, tiny networks that keep what the method needs (BatchNorm layers for the ``bn``
and ``contrastive`` terms), random teachers, small batches, two steps. The datasets hold their
**test split only**, so a run that touched the training data would fail: these recipes are
data-free.

To keep the file fast, one pair per (dataset, method) runs; the other pairs of that method and
dataset are checked to differ from it only in the teacher, the student and the output folder.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dfkd.data import build_dataset
from dfkd.errors import DatasetNotFoundError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from test_data import CIFAR10_CLASSES, cifar_data, labelled_pixels, write_class_tree, write_idx, write_pickle

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FAMILIES = ("mnist", "cifar10", "cifar100")
METHODS = ("dafl", "zskt", "dfad", "dfq", "deepinversion", "cmi", "cudfkd")
# The data-free methods' recipes; the real-data curricula and CTKD have theirs checked in test_curricula.py.
_METHOD_RECIPES = sorted(p for family in FAMILIES for method in METHODS for p in (RECIPES / family / method).glob("*.yaml"))
# A pair recipe is named after its networks; its CPU variant (``<pair>_cpu.yaml``) is right-sized for a
# 2-core CPU by measured time to accuracy, builds on the pair recipe with ``base:``, and runs on its own.
PAIR_RECIPES = [p for p in _METHOD_RECIPES if not p.stem.endswith("_cpu")]
CPU_VARIANTS = [p for p in _METHOD_RECIPES if p.stem.endswith("_cpu")]
JPEG_RECIPES = sorted(p for p in (RECIPES / "cifar10_jpeg").glob("*.yaml") if p.name.split("_")[0] in METHODS)
# Data-free methods combined with a policy from elsewhere (CuDFKD with CTKD's learnt temperature).
COMBINED_RECIPES = sorted(RECIPES.glob("*/cudfkd_ctkd/*.yaml"))


def _family_method(recipe: Path) -> tuple[str, str]:
    return recipe.parent.parent.name, recipe.parent.name


def _representatives() -> dict[tuple[str, str], Path]:
    """The pair that runs for each (dataset, method): the first in sorted order."""
    chosen: dict[tuple[str, str], Path] = {}
    for recipe in PAIR_RECIPES:
        chosen.setdefault(_family_method(recipe), recipe)
    return chosen


REPRESENTATIVES = _representatives()
RUN = sorted(REPRESENTATIVES.values()) + CPU_VARIANTS + JPEG_RECIPES + COMBINED_RECIPES
SIBLINGS = [p for p in PAIR_RECIPES if p not in REPRESENTATIVES.values()]


def _rel(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


@cache
def _loaded(recipe: Path) -> dict:
    """The recipe as a plain dict, loaded once per session."""
    return OmegaConf.to_container(load_config(recipe))


pytestmark = pytest.mark.usefixtures("one_thread")


# -- tiny test splits in the real on-disk formats (no training split anywhere)


@pytest.fixture(scope="session")
def test_splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{data.name: data.root}`` for tiny test splits: MNIST idx, CIFAR pickles and a JPEG class tree."""
    root = tmp_path_factory.mktemp("splits")
    labels = [k % 10 for k in range(20)]
    write_idx(root / "mnist/MNIST/raw/t10k-images-idx3-ubyte", labelled_pixels(labels, (28, 28)))
    write_idx(root / "mnist/MNIST/raw/t10k-labels-idx1-ubyte", np.asarray(labels))
    write_pickle(root / "cifar10/cifar-10-batches-py/test_batch", {"labels": labels, "data": cifar_data(labels)})
    fine = [5 * k + 4 for k in range(20)]  # up to 99: the class count is read from the largest label
    write_pickle(root / "cifar100/cifar-100-python/test", {"fine_labels": fine, "data": cifar_data(fine)})
    write_class_tree(root / "cifar10_jpeg/test", CIFAR10_CLASSES, per_class=2, ext=".jpg")
    return {name: root / name for name in ("mnist", "cifar10", "cifar100", "cifar10_jpeg")}


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "cifar10_jpeg"])
def test_the_tiny_datasets_have_no_training_split(name: str, test_splits) -> None:
    """What makes the runs below proof that the recipes never read the training data."""
    _, test = build_dataset(name, test_splits[name], "test")
    assert len(test) == 20
    with pytest.raises(DatasetNotFoundError):
        build_dataset(name, test_splits[name], "train")


def _tiny_overrides(recipe: Path, data_root: Path, output_dir: Path) -> list[str]:
    cfg = OmegaConf.create(_loaded(recipe))
    bn_free = cfg.data.name == "mnist"  # LeNet-5 recipes: already tiny, and they must run without BatchNorm
    overrides = [
        f"output_dir={output_dir}", f"data.root={data_root}", "data.num_workers=0",
        "teacher.checkpoint=null", "teacher.recipe=null",
        "train.epochs=1", "train.steps_per_epoch=2", "train.log_every=1", "train.progress_bar=false",
        "eval.batch_size=64", "source.batch_size=8", "synthesizer.batch_size=8",
    ]
    if not bn_free:
        overrides += ["teacher.arch=resnet8", "student.arch=resnet8"]
    if cfg.source.name == "pool":
        overrides += ["source.pool_size=64", "synthesizer.g_steps=2"]
    if "contrastive" in cfg.synthesizer.terms:
        overrides += ["synthesizer.terms.contrastive.bank_size=64", "synthesizer.terms.contrastive.n_neg=16"]
    return overrides


def _finite_numbers(record: dict) -> dict[str, float]:
    """The numbers of a summary or metrics line, checked finite (metrics.jsonl writes NaN and inf as null)."""
    assert not [k for k, v in record.items() if v is None], f"null (non-finite) values in {record}"
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
    assert not bad, f"non-finite values: {bad}"
    return numbers


@pytest.mark.parametrize("recipe", RUN, ids=_rel)
def test_method_recipe_runs_two_steps_without_training_data(recipe: Path, test_splits, tmp_path: Path) -> None:
    name = _loaded(recipe)["data"]["name"]
    cfg = load_config(recipe, _tiny_overrides(recipe, test_splits[name], tmp_path / "run"))
    assert cfg.synthesizer is not None and cfg.source.name in ("generator", "pool"), "a data-free recipe"
    Trainer(cfg).fit()

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["epochs"] == 1
    numbers = _finite_numbers(summary)
    for key in ("final_acc1", "final_agree1", "final_loyalty", "synth_s", "wall_s"):
        assert key in numbers, key
    assert summary["synth_s"] > 0, "the run synthesised its samples"
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        _finite_numbers(json.loads(line))


@pytest.mark.parametrize("recipe", SIBLINGS, ids=_rel)
def test_other_pairs_differ_from_the_run_pair_only_in_the_networks(recipe: Path) -> None:
    tested = REPRESENTATIVES[_family_method(recipe)]
    networks = ("teacher", "student", "output_dir")
    plain = {k: v for k, v in _loaded(recipe).items() if k not in networks}
    reference = {k: v for k, v in _loaded(tested).items() if k not in networks}
    assert plain == reference, f"{_rel(recipe)} must differ from {_rel(tested)} only in its networks"


@pytest.mark.parametrize("recipe", CPU_VARIANTS, ids=_rel)
def test_cpu_variants_build_on_their_pair_recipe(recipe: Path) -> None:
    pair = recipe.with_name(recipe.stem.removesuffix("_cpu") + ".yaml")
    assert pair in PAIR_RECIPES, f"{_rel(recipe)} has no pair recipe {_rel(pair)}"
    raw = OmegaConf.load(recipe)
    assert raw.base == pair.name, f"{_rel(recipe)} must build on {pair.name} with base:"
    assert _loaded(recipe)["output_dir"] == _loaded(pair)["output_dir"] + "_cpu"


@pytest.mark.parametrize("recipe", PAIR_RECIPES, ids=_rel)
def test_pair_recipes_follow_the_layout(recipe: Path) -> None:
    family, method = _family_method(recipe)
    cfg = OmegaConf.create(_loaded(recipe))
    pair = f"{cfg.teacher.arch}_{cfg.student.arch}"
    assert recipe.stem == pair and cfg.data.name == family
    assert cfg.output_dir == f"runs/{family}/{method}/{pair}"
    assert cfg.teacher.checkpoint == f"runs/{family}/teacher_{cfg.teacher.arch}/student.safetensors"
    assert cfg.teacher.recipe == f"recipes/{family}/teacher_{cfg.teacher.arch}.yaml"
    assert (ROOT / cfg.teacher.recipe).is_file(), "a missing teacher is trained by this recipe"
    text = recipe.read_text()
    # A pair inherits its method's base, or, where the sources give no setting for the dataset and the
    # recipe composes its own (MNIST CuDFKD), stands alone and says so in its header.
    assert text.count("\nbase: ../../methods/") == 1 or "is a composition" in text


def test_every_method_has_recipes_for_every_dataset() -> None:
    for family in FAMILIES:
        assert {m for f, m in REPRESENTATIVES if f == family} == set(METHODS), family
    assert len(PAIR_RECIPES) == 7 + 2 * 7 * 5
    assert {p.name.split("_")[0] for p in JPEG_RECIPES} == {"cudfkd", "dafl", "dfq", "cmi"}
