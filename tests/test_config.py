"""Recipes: schema validation, overrides, clear errors, and every recipe in recipes/ loads."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dfkd.components import check_component
from dfkd.config import merge_config, save_config
from dfkd.errors import ConfigError
from dfkd.policies.schedules import SCHEDULES
from dfkd.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
# recipes/methods/ holds partial recipes (a method's composition and defaults) that complete recipes
# inherit with `base:`; they are checked through the recipes that name them.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if not {"accelerate", "methods", "settings"} & set(p.parts))
METHOD_BASES = sorted((ROOT / "recipes" / "methods").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_validates_and_names_its_launch_command(recipe):
    cfg = load_config(recipe)
    assert cfg.student.arch != "???"
    rel = recipe.relative_to(ROOT).as_posix()
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    assert any(f"dfkd train {rel}" in line for line in header), f"{rel} must open with its exact launch command"


def test_recipes_exist():
    assert len(RECIPES) >= 10


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(_write(tmp_path, "student: {arch: resnet20}\n"), ["train.epochs=3", "optim.lr=1e-3", "data.mean=[0.5,0.5,0.5]"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert list(cfg.data.mean) == [0.5, 0.5, 0.5]
    assert cfg.output_dir == "runs/recipe"


def test_unknown_key_names_it_and_suggests_the_close_match(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "student: {arch: resnet20}\ntrain: {epoch: 3}\n"))
    assert "'train.epoch'" in str(err.value) and "Did you mean 'train.epochs'" in str(err.value)


def test_unknown_section_suggests_the_close_match(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'teacher'"):
        load_config(_write(tmp_path, "student: {arch: resnet20}\nteacher_: {arch: resnet20}\n"))


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'optim.weight_decay'"):
        load_config(_write(tmp_path, "student: {arch: resnet20}\n"), ["optim.weight_dacay=0"])


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "student: {arch: resnet20}\n"), ["train.epochs=ten"])
    message = str(err.value)
    assert "'train.epochs'" in message and "int" in message and "'ten'" in message


def test_unknown_model_and_dataset_suggest_close_names(tmp_path):
    with pytest.raises(ConfigError, match="resnet20"):
        load_config(_write(tmp_path, "student: {arch: resnet2O}\n"))
    with pytest.raises(ConfigError, match="cifar10"):
        load_config(_write(tmp_path, "student: {arch: resnet20}\ndata: {name: cifar01}\n"))


def test_component_options_are_checked_against_the_factory(tmp_path):
    ok = check_component(SCHEDULES, {"name": "multistep", "milestones": [3, 6]}, "optim.schedule")
    assert ok.gamma == pytest.approx(0.1)  # default filled in
    with pytest.raises(ConfigError, match="Did you mean 'optim.schedule.milestones'"):
        check_component(SCHEDULES, {"name": "multistep", "milestone": [3]}, "optim.schedule")
    with pytest.raises(ConfigError, match="needs milestones"):
        check_component(SCHEDULES, {"name": "multistep"}, "optim.schedule")
    with pytest.raises(ConfigError, match="'optim.schedule.gamma' expects float"):
        check_component(SCHEDULES, {"name": "multistep", "milestones": [1], "gamma": "fast"}, "optim.schedule")
    with pytest.raises(ConfigError, match="Did you mean 'cosine'"):
        check_component(SCHEDULES, {"name": "cosin"}, "optim.schedule")


def test_source_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'source.batch_size'"):
        load_config(_write(tmp_path, "student: {arch: resnet20}\nsource: {name: real, batchsize: 3}\n"))


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "student: {arch: [unclosed\n"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_yaml_never_constructs_python_objects(tmp_path):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, "student: !!python/object/apply:os.system ['echo pwned']\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, "student: {arch: resnet20}\n"), ["train.epochs=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = merge_config(OmegaConf.load(tmp_path / "config.yaml"))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert again.optim.schedule.end == 0.0  # component defaults are written out in full


# --------------------------------------------------------------------------- recipe inheritance (base:)


def _recipe(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_first_then_the_recipe_then_the_overrides(tmp_path):
    _recipe(tmp_path, "base.yaml", "student: {arch: resnet8}\ntrain: {epochs: 5, log_every: 7}\noptim: {lr: 0.5}\n")
    child = _recipe(tmp_path, "child.yaml", "base: base.yaml\ntrain: {epochs: 9}\n")
    cfg = load_config(child, ["optim.lr=0.25"])
    assert cfg.student.arch == "resnet8"
    assert cfg.train.epochs == 9, "the recipe overrides its base"
    assert cfg.train.log_every == 7, "keys the recipe does not set come from the base"
    assert cfg.optim.lr == 0.25, "the command line overrides both"
    assert cfg.output_dir == "runs/child", "the default output folder follows the recipe, not its base"


def test_a_list_of_bases_merges_in_order(tmp_path):
    _recipe(tmp_path, "a.yaml", "student: {arch: resnet8}\ntrain: {epochs: 1, log_every: 3}\n")
    _recipe(tmp_path, "b.yaml", "train: {epochs: 2}\noptim: {lr: 0.3}\n")
    cfg = load_config(_recipe(tmp_path, "c.yaml", "base: [a.yaml, b.yaml]\noptim: {momentum: 0.5}\n"))
    assert (cfg.train.epochs, cfg.train.log_every, cfg.optim.lr, cfg.optim.momentum) == (2, 3, 0.3, 0.5)
    cfg = load_config(_recipe(tmp_path, "d.yaml", "base: [b.yaml, a.yaml]\n"))
    assert cfg.train.epochs == 1, "the later base wins"


def test_nested_bases_are_relative_to_the_recipe_that_names_them(tmp_path, monkeypatch):
    _recipe(tmp_path, "methods/common.yaml", "student: {arch: resnet8}\ntrain: {epochs: 4}\n")
    _recipe(tmp_path, "methods/method.yaml", "base: common.yaml\ntrain: {log_every: 11}\n")
    pair = _recipe(tmp_path, "data/method/pair.yaml", "base: ../../methods/method.yaml\nseed: 3\n")
    cfg = load_config(pair)
    assert (cfg.student.arch, cfg.train.epochs, cfg.train.log_every, cfg.seed) == ("resnet8", 4, 11, 3)
    (tmp_path / "run-from-here").mkdir()
    monkeypatch.chdir(tmp_path / "run-from-here")  # the working directory plays no part in finding a base
    assert load_config(Path("..") / "data/method/pair.yaml").train.log_every == 11


def test_a_cycle_of_bases_names_the_chain(tmp_path):
    _recipe(tmp_path, "a.yaml", "base: b.yaml\nstudent: {arch: resnet8}\n")
    _recipe(tmp_path, "b.yaml", "base: c.yaml\n")
    _recipe(tmp_path, "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(tmp_path / "a.yaml")
    message = str(err.value)
    assert all(f"{name}.yaml" in message for name in "abc")
    assert message.index("a.yaml") < message.index("b.yaml") < message.index("c.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(_recipe(tmp_path, "self.yaml", "base: self.yaml\n"))


def test_a_missing_base_names_where_it_looked_and_who_asked(tmp_path):
    child = _recipe(tmp_path, "sub/child.yaml", "base: ../nope/base.yaml\nstudent: {arch: resnet8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    message = str(err.value)
    assert "'../nope/base.yaml'" in message and str(child) in message
    assert str((tmp_path / "nope" / "base.yaml").resolve()) in message


def test_base_must_be_a_path_or_a_list_of_paths(tmp_path):
    with pytest.raises(ConfigError, match="must be a path or a list of paths"):
        load_config(_recipe(tmp_path, "r.yaml", "base: {a: 1}\nstudent: {arch: resnet8}\n"))


def test_base_on_the_command_line_is_refused(tmp_path):
    _recipe(tmp_path, "base.yaml", "student: {arch: resnet8}\n")
    with pytest.raises(ConfigError, match="cannot be set on the command line"):
        load_config(None, [f"base={tmp_path / 'base.yaml'}"])
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_config({"base": "base.yaml", "student": {"arch": "resnet8"}})


def test_a_renamed_component_replaces_the_bases_options(tmp_path):
    _recipe(tmp_path, "base.yaml", (
        "student: {arch: resnet8}\n"
        "weighting: {name: log, threshold: {name: affine, start: 2.0, slope: 0.04}}\n"
        "optim: {schedule: {name: multistep, milestones: [3, 6], gamma: 0.5}}\n"
    ))
    child = _recipe(tmp_path, "child.yaml", (
        "base: base.yaml\nweighting: {name: uniform}\noptim: {schedule: {name: cosine, end: 0.1}}\n"
    ))
    cfg = load_config(child)
    assert OmegaConf.to_container(cfg.weighting) == {"name": "uniform"}, "no threshold left behind"
    assert OmegaConf.to_container(cfg.optim.schedule) == {"name": "cosine", "start": 1.0, "end": 0.1}
    same = load_config(_recipe(tmp_path, "same.yaml", "base: base.yaml\noptim: {schedule: {gamma: 0.2}}\n"))
    assert list(same.optim.schedule.milestones) == [3, 6] and same.optim.schedule.gamma == 0.2, "same name: merged"


def test_a_null_term_removes_it_from_the_bases_synthesizer(tmp_path):
    _recipe(tmp_path, "base.yaml", (
        "student: {arch: resnet8}\nteacher: {arch: resnet8}\nsource: {name: generator}\n"
        "synthesizer: {name: generative, generator: {name: dcgan}, terms: {bn: 1.0, oh: 1.0}}\n"
    ))
    cfg = load_config(_recipe(tmp_path, "child.yaml", "base: base.yaml\nsynthesizer: {terms: {bn: null}}\n"))
    assert list(cfg.synthesizer.terms) == ["oh"]
    with pytest.raises(ConfigError, match="at least one term"):
        load_config(tmp_path / "child.yaml", ["synthesizer.terms.oh=null"])


def test_the_saved_config_is_resolved_and_has_no_base(tmp_path):
    _recipe(tmp_path, "base.yaml", "student: {arch: resnet8}\ntrain: {epochs: 5}\n")
    cfg = load_config(_recipe(tmp_path, "child.yaml", "base: base.yaml\noptim: {lr: 0.2}\n"))
    save_config(cfg, tmp_path / "config.yaml")
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert "base" not in saved
    assert saved.train.epochs == 5 and saved.optim.lr == 0.2 and saved.student.arch == "resnet8"
    assert OmegaConf.to_container(load_config(tmp_path / "config.yaml")) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize("base", METHOD_BASES, ids=lambda p: p.name)
def test_every_method_base_is_used_and_cites_its_sources(base):
    header = [line for line in base.read_text().splitlines() if line.startswith("#")]
    assert len(header) >= 3, f"{base.name} needs a header comment naming its sources"
    users = [p for p in RECIPES if f"methods/{base.name}" in p.read_text()]
    users += [p for p in METHOD_BASES if p != base and f"base: {base.name}" in p.read_text()]
    assert users, f"no recipe inherits {base.name}"
