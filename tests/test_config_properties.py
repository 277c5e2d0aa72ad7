"""Property tests of the recipe loader: a mutated real recipe loads, or fails with one clean message.

Each example resolves a real recipe and mutates it: a value replaced by one of any type, a key
misspelt or added at any depth, a key deleted, or several of these at once. The mutations reach
:func:`dfkd.recipe.load_config` as command-line overrides, as a recipe file that inherits the real
one with ``base:``, or as a full dump of the mutated config. Whatever the input, ``load_config``
either returns a config that :func:`dfkd.config.save_config` writes and ``load_config`` reads back
unchanged, or raises one of :data:`dfkd.errors.USER_ERRORS` with a one-paragraph message; a
misspelt or unknown key is always refused, by its dotted name. Any other exception fails the test.
"""

from __future__ import annotations

import copy
import functools
import string
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from dfkd.config import save_config
from dfkd.errors import USER_ERRORS
from dfkd.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [ROOT / "recipes" / name for name in (
    "quickstart.yaml",  # two levels of base: mnist/fastest.yaml, then the DAFL CPU recipe
    "procedural/cudfkd_resnet20_resnet8.yaml",
    "procedural/teacher_resnet20.yaml",
    "mnist/cudfkd_ctkd/lenet5_lenet5_half.yaml",  # two levels of base, CTKD's temperature
    "mnist/dfq/lenet5_lenet5_half.yaml",
    "cifar10_jpeg/cmi_resnet56a_resnet20.yaml",  # a pool source and a contrastive term
    "cifar10_jpeg/dcd_resnet56a_resnet20.yaml",  # a curriculum
    "cifar10_jpeg/ctkd_instance_resnet56a_resnet20.yaml",
    "cifar10/deepinversion/resnet34_resnet18.yaml",  # the inversion synthesizer
    "methods/dafl.yaml",
    "methods/mekd.yaml",
    "methods/tc3kd.yaml",
)]
CUDFKD, DCD, DAFL = (ROOT / "recipes" / name for name in (
    "procedural/cudfkd_resnet20_resnet8.yaml", "cifar10_jpeg/dcd_resnet56a_resnet20.yaml", "methods/dafl.yaml"
))
# recipes/methods/ holds partial recipes; like the recipes that inherit them, each example completes them with a student.
COMPLETION = {"student": {"arch": "resnet20"}}

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Keys are drawn from characters that mean nothing to the dotted override syntax, so that the key
# a mutation writes is the key load_config sees, on the command line and in a file alike.
KEY_CHARS = string.ascii_lowercase + string.digits + "_-é"
KEYS = st.text(KEY_CHARS, min_size=1, max_size=10)
# Strings that mean something to YAML or OmegaConf: missing values, interpolations, resolvers,
# YAML's other spellings of null, bools and numbers, and unclosed flow collections.
ODD_STRINGS = (
    "", " ", "???", "${train.epochs}", "${nope}", "${oc.env:DFKD_UNSET_VARIABLE}", "${oc.decode:'[1'}",
    "${", "\\${x}", "null", "~", "yes", "NaN", ".inf", "1e3", "0x1F", "[", "{a: 1", "a: b", "- x",
    "#", "'", '"', "!!python/object/apply:os.system ['true']", "\t\n", "é∑😀", "\x00",
)


# The lines OmegaConf appends to its own errors: a clean message translates them away.
OMEGACONF_DETAILS = ("full_key:", "object_type=", "reference_type=")


def _nodes(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(dotted key, value)`` of a nested mapping, mappings included; lists are leaves."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        yield dotted, value
        if isinstance(value, dict):
            yield from _nodes(value, f"{dotted}.")


def _completion(recipe: Path) -> dict[str, Any]:
    return COMPLETION if recipe.parent.name == "methods" else {}


def _completion_overrides(recipe: Path) -> list[str]:
    return [f"{key}={value}" for key, value in _nodes(_completion(recipe)) if not isinstance(value, dict)]


@functools.cache
def _resolved(recipe: Path) -> dict[str, Any]:
    """The recipe as load_config resolves it (every default filled in), as plain data."""
    return OmegaConf.to_container(load_config(recipe, _completion_overrides(recipe)))


@functools.cache
def _recipe_values() -> list[Any]:
    """Leaves that real recipes hold (registry names, paths, weights).

    A replacement drawn from them reaches deeper validation than random data does, by naming
    another component, say. Computed on first use, so that collecting the tests loads no recipe.
    """
    return sorted({repr(v): v for r in RECIPES for _, v in _nodes(_resolved(r)) if not isinstance(v, dict)}.values(), key=repr)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.floats(),  # nan, inf and -inf included
    st.text(max_size=12),
    st.sampled_from(ODD_STRINGS),
    st.deferred(lambda: st.sampled_from(_recipe_values())),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6
)


def _like(value: Any) -> st.SearchStrategy[Any]:
    """Values of ``value``'s own type: they pass the type checks and reach the range and registry checks."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-2, 2) | st.integers()
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return st.sampled_from([v for v in _recipe_values() if isinstance(v, str)]) | st.text(max_size=8)
    if isinstance(value, list):
        return st.lists(st.integers(-2, 5) | st.floats(), max_size=4)
    return VALUES


@dataclass(frozen=True)
class Mutation:
    """One change to a recipe.

    ``kind`` is ``replace`` (``key`` gets ``value``), ``misspell`` (``old`` is written as ``key``,
    with its value), ``add`` (the unknown ``key`` gets ``value``), ``delete`` (``key`` is removed,
    in a full dump only) or ``raw`` (``key=<value>`` verbatim, on the command line only).
    """

    kind: str
    key: str
    value: Any = None
    old: str = ""


def _misspellings(word: str) -> st.SearchStrategy[str]:
    """``word`` with one character inserted, deleted, or swapped with the next."""

    def edit(op: str, i: int, char: str) -> str:
        i = min(i, {"insert": len(word), "delete": len(word) - 1, "swap": len(word) - 2}[op])
        if op == "insert":
            return word[:i] + char + word[i:]
        if op == "delete":
            return word[:i] + word[i + 1:]
        return word[:i] + word[i + 1:i + 2] + word[i] + word[i + 2:]

    ops = ["insert", "delete", "swap"] if len(word) > 1 else ["insert"]
    return st.builds(edit, st.sampled_from(ops), st.integers(0, len(word)), st.sampled_from(KEY_CHARS))


@st.composite
def _mutations(draw: st.DrawFn, recipe: Path, kinds: tuple[str, ...], max_size: int = 3) -> list[Mutation]:
    nodes = list(_nodes(_resolved(recipe)))
    children: dict[str, set[str]] = {"": set(_resolved(recipe))}
    children.update((f"{key}.", set(value)) for key, value in nodes if isinstance(value, dict))
    mutations = []
    for _ in range(draw(st.integers(1, max_size))):
        kind = draw(st.sampled_from(kinds))
        if kind == "add":
            parent = draw(st.sampled_from(sorted(children)))
            name = draw(KEYS.filter(lambda k, taken=children[parent]: k not in taken))
            mutations.append(Mutation("add", parent + name, draw(VALUES)))
            continue
        key, value = draw(st.sampled_from(nodes))
        parent, _, leaf = key.rpartition(".")
        parent = f"{parent}." if parent else ""
        if kind == "misspell":
            name = draw(_misspellings(leaf).filter(lambda k, taken=children[parent]: k and k not in taken))
            mutations.append(Mutation("misspell", parent + name, value, old=key))
        elif kind == "raw":
            mutations.append(Mutation("raw", key, draw(st.text(max_size=12) | st.sampled_from(ODD_STRINGS))))
        else:
            mutations.append(Mutation(kind, key, draw(_like(value) | VALUES) if kind == "replace" else None))
    return mutations


def _cases(kinds: tuple[str, ...], max_size: int = 3) -> st.SearchStrategy[tuple[Path, list[Mutation]]]:
    return st.sampled_from(RECIPES).flatmap(lambda r: st.tuples(st.just(r), _mutations(r, kinds, max_size)))


# --------------------------------------------------------------------------- applying mutations


def _yaml(value: Any) -> str:
    """``value`` as one YAML flow value, for the right-hand side of an override."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.removesuffix("\n...\n").removesuffix("\n")


def _overrides(recipe: Path, mutations: list[Mutation]) -> list[str]:
    return _completion_overrides(recipe) + [f"{m.key}={m.value if m.kind == 'raw' else _yaml(m.value)}" for m in mutations]


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[leaf] = value


def _pop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return  # an earlier mutation replaced or removed this section
    tree.pop(leaf, None)


def _child_recipe(recipe: Path, mutations: list[Mutation]) -> dict[str, Any]:
    """A recipe inheriting ``recipe`` that writes each mutation; a misspelt key is written beside the base's own."""
    child = {"base": str(recipe), **copy.deepcopy(_completion(recipe))}
    for m in mutations:
        _set(child, m.key, m.value)
    return child


def _full_dump(recipe: Path, mutations: list[Mutation]) -> dict[str, Any]:
    """The resolved recipe with each mutation applied in place; a misspelt key replaces the original."""
    tree = copy.deepcopy(_resolved(recipe))
    for m in mutations:
        if m.kind in ("misspell", "delete"):
            _pop(tree, m.old or m.key)
        if m.kind != "delete":
            _set(tree, m.key, m.value)
    return tree


def _load(recipe: Path, mutations: list[Mutation], route: str, folder: Path) -> Callable[[], DictConfig]:
    """A call of load_config that delivers ``mutations`` by ``route``: overrides, child or dump."""
    if route == "overrides":
        return functools.partial(load_config, recipe, _overrides(recipe, mutations))
    tree = _child_recipe(recipe, mutations) if route == "child" else _full_dump(recipe, mutations)
    path = folder / f"{recipe.stem}.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))
    return functools.partial(load_config, path)


# --------------------------------------------------------------------------- the property


def _load_or_fail_cleanly(load: Callable[[], DictConfig], folder: Path) -> Exception | None:
    """Run ``load``: it returns a config that round-trips, or raises a user error with a clean message (returned)."""
    try:
        cfg = load()
    except USER_ERRORS as err:
        message = str(err)
        assert len(message.split()) >= 3, f"not a sentence: {message!r}"
        assert "\n\n" not in message.strip() and "Traceback" not in message, f"not one paragraph: {message!r}"
        assert not any(detail in message for detail in OMEGACONF_DETAILS), f"OmegaConf's internals: {message!r}"
        return err
    assert isinstance(cfg, DictConfig)
    save_config(cfg, folder / "config.yaml")
    again = load_config(folder / "config.yaml")
    assert OmegaConf.to_yaml(again, resolve=True) == OmegaConf.to_yaml(cfg, resolve=True)  # text: nan equals nan
    return None


# The @examples are inputs that once leaked an exception other than a ConfigError, or named the wrong key.
@SETTINGS
@given(case=_cases(("replace", "misspell", "add", "raw")))
@example(case=(CUDFKD, [Mutation("raw", "output_dir", "[")]))  # yaml.ParserError
@example(case=(CUDFKD, [Mutation("replace", "synthesizer", []), Mutation("replace", "synthesizer.name", "x")]))  # ValueError
@example(case=(CUDFKD, [Mutation("replace", "weighting.name", [])]))  # TypeError: unhashable
@example(case=(CUDFKD, [Mutation("replace", "weighting", [])]))  # TypeError: incompatible containers
@example(case=(CUDFKD, [Mutation("replace", "data.mean", {})]))  # the same, on a typed list that holds null
@example(case=(CUDFKD, [Mutation("raw", "output_dir", "${oc.env:DFKD_UNSET_VARIABLE}")]))  # InterpolationResolutionError
@example(case=(CUDFKD, [Mutation("raw", "output_dir", "\\${x}")]))  # an escape that resolves to an interpolation
@example(case=(CUDFKD, [Mutation("raw", "loss.terms", "${train.epochs}")]))  # named '?'
def test_mutated_overrides_load_or_fail_cleanly(case):
    recipe, mutations = case
    with tempfile.TemporaryDirectory() as folder:
        _load_or_fail_cleanly(_load(recipe, mutations, "overrides", Path(folder)), Path(folder))


@SETTINGS
@given(case=_cases(("replace", "misspell", "add")), route=st.sampled_from(["child", "dump"]))
@example(case=(DCD, [Mutation("replace", "source.curriculum", [])]), route="dump")  # TypeError in check_component
@example(case=(CUDFKD, [Mutation("replace", "temperature", {"t": "???"})]), route="dump")  # MissingMandatoryValue
@example(case=(CUDFKD, [Mutation("add", "source.x", "${")]), route="child")  # OmegaConf's details in the message
def test_mutated_recipe_files_load_or_fail_cleanly(case, route):
    recipe, mutations = case
    with tempfile.TemporaryDirectory() as folder:
        _load_or_fail_cleanly(_load(recipe, mutations, route, Path(folder)), Path(folder))


@SETTINGS
@given(case=_cases(("replace", "delete", "misspell", "add")))
@example(case=(DAFL, [Mutation("delete", "student.arch")]))  # MissingMandatoryValue
def test_deletions_in_a_full_dump_load_or_fail_cleanly(case):
    recipe, mutations = case
    with tempfile.TemporaryDirectory() as folder:
        _load_or_fail_cleanly(_load(recipe, mutations, "dump", Path(folder)), Path(folder))


def _names(message: str, key: str) -> bool:
    """Whether ``message`` names the dotted ``key``: in full, or as its section and its quoted last part.

    The second form is how a registry names a misspelt term (``loss.terms: ... no entry 'kdd'``) and how
    a section that must be a number shows the key written under it (``... balance must be a weight ...,
    got {'temperature': 3}``).
    """
    parent, _, leaf = key.rpartition(".")
    return key in message or (parent in message and repr(leaf) in message)


@SETTINGS
@given(case=_cases(("misspell", "add"), max_size=1), route=st.sampled_from(["overrides", "child", "dump"]))
@example(case=(DAFL, [Mutation("misspell", "source.aname", "generator", old="source.name")]), route="dump")  # named kd_steps
def test_a_misspelt_or_unknown_key_is_refused_by_name(case, route):
    recipe, [mutation] = case
    with tempfile.TemporaryDirectory() as folder:
        err = _load_or_fail_cleanly(_load(recipe, [mutation], route, Path(folder)), Path(folder))
    assert err is not None, f"{mutation.key!r} was accepted"
    assert _names(str(err), mutation.key), f"the message does not name {mutation.key!r}: {err}"


def test_a_null_unknown_term_is_refused_by_name():
    with pytest.raises(USER_ERRORS, match="synthesizer.terms.bnn"):
        load_config(CUDFKD, ["synthesizer.terms.bnn=null"])  # meant: bn=null


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_unmutated_recipe_round_trips(recipe):
    with tempfile.TemporaryDirectory() as folder:
        assert _load_or_fail_cleanly(_load(recipe, [], "overrides", Path(folder)), Path(folder)) is None
