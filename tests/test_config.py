"""Recipes: schema validation, overrides, clear errors, and every recipe in recipes/ loads."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dfkd.config import check_component, load_config, merge_config, save_config
from dfkd.errors import ConfigError
from dfkd.policies.schedules import SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


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
