"""`dicomnode models` (list, activate) and how the train/evaluate/models commands are wired."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch

from node.cli import _parser, main
from node.train_commands import registry_root, train_settings
from pipeline.model.card import ModelCard, save_model
from pipeline.model.registry import ModelRegistry, RegistryError
from pipeline.model.unet import UNet
from tests.support.models import activate_recipe
from tests.support.paths import REPO
from train.trainer import TrainSettings, shipped_arguments


def run(argv: list[str]) -> int:
    return main(argv)


def add_version(registry: ModelRegistry, name: str, seed: int) -> ModelCard:
    torch.manual_seed(seed)
    arguments = {"in_channels": 3, "base_width": 2, "depth": 1}
    version = registry.next_version(name)
    card = ModelCard(
        name=name,
        version=version,
        direction="t1-to-t2",
        arguments=arguments,
        normalization="minmax-slice",
        gradient_channels=True,
        metrics={
            "held_out": {
                "overall": {
                    "model": {"psnr_head": 20.0 + seed, "ssim_head": 0.5},
                    "inverted": {"psnr_head": 15.0, "ssim_head": 0.3},
                },
                # The second version's held-out patient had a lesion mask.
                "studies": [{"lesions": {"model": {"fidelity": 0.6}}}] if seed == 2 else [],
            }
        },
    )
    card = save_model(registry.path(name, version), UNet(**arguments), card)
    registry.write_card(name, card)
    return card


def test_every_subcommand_has_config_and_run() -> None:
    parser = _parser(training=True)
    for argv in (
        ["train", "DATA", "--direction", "t1-to-t2"],
        ["evaluate", "MODEL", "DATA"],
        ["models"],
        ["models", "list"],
        ["models", "activate", "t1-to-t2", "v1"],
    ):
        args = parser.parse_args([*argv, "--config", "node.toml"])
        assert args.config == Path("node.toml") and callable(args.run)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "DATA", "--direction", "t1-to-flair"])


def test_train_options_reach_the_network_and_the_rest_stay_the_default_recipes() -> None:
    parser = _parser(training=True)

    def arguments(*options: str) -> dict[str, object]:
        argv = ["train", "DATA", "--direction", "t1-to-t2", *options]
        return train_settings(parser.parse_args(argv)).arguments

    assert arguments() == shipped_arguments()
    changed = arguments("--base-width", "4", "--upsampling", "bilinear", "--no-skip-connections")
    assert changed == {
        **shipped_arguments(),
        "base_width": 4,
        "upsampling": "bilinear",
        "skip_connections": False,
    }
    assert arguments("--input-shortcut")["input_shortcut"] is True
    assert arguments("--no-input-shortcut")["input_shortcut"] is False
    # The slice, its two neighbours, and the Sobel channels unless turned off.
    assert arguments("--no-gradient-channels")["in_channels"] == 3
    assert arguments("--neighbours", "0", "--no-gradient-channels")["in_channels"] == 1


def test_options_change_only_what_they_name_of_the_recipe_they_start_from() -> None:
    parser = _parser(training=True)
    base = TrainSettings(
        direction="t1-to-t2",
        arguments={**shipped_arguments(), "base_width": 16},
        lesion_painting=1.0,
        painted_tumour_share=0.0,
        epochs=48,
        seed=3,
    )

    def settings(*options: str) -> TrainSettings:
        argv = ["train", "DATA", "--direction", "t1-to-t2", *options]
        return train_settings(parser.parse_args(argv), base)

    assert settings() == base
    assert settings("--seed", "0", "--epochs", "2") == dataclasses.replace(base, seed=0, epochs=2)
    # Given explicitly, a value equal to the library's default still wins over the recipe's.
    assert settings("--lesion-painting", "0.5").lesion_painting == 0.5
    assert settings("--precision", "bfloat16") == dataclasses.replace(base, precision="bfloat16")
    flat = settings("--neighbours", "0", "--no-augment")
    assert flat.neighbour_distance_mm is None and flat.augment is False
    assert flat.arguments == {**base.arguments, "in_channels": 3}  # the slice and its gradients


def test_train_recipe_active_starts_from_the_active_models_card(tmp_path, capsys) -> None:
    registry = ModelRegistry(tmp_path / "models")
    empty = tmp_path / "no-studies"
    empty.mkdir()
    argv = ["train", str(empty), "--direction", "t1-to-t2", "--recipe", "active"]
    argv += ["--registry", str(registry.root)]

    assert run(argv) == 2  # nothing active: no recipe to repeat, and no data read
    assert "train: model 't1-to-t2' has no active version" in capsys.readouterr().err

    recipe = TrainSettings(
        direction="t1-to-t2",
        arguments={**shipped_arguments(), "base_width": 2, "depth": 1},
        lesion_painting=1.0,
    )
    activate_recipe(registry, recipe, reference={})
    assert run([*argv, "--painted-tumour-share", "1.5"]) == 2  # a bad option is still named
    assert "painted_tumour_share is a probability" in capsys.readouterr().err
    assert run(argv) == 1  # the recipe is read; then the folder has no pairs
    captured = capsys.readouterr()
    assert "train: the recipe of t1-to-t2 v1, with the options given" in captured.out
    assert f"no T1/T2 pairs found under {empty}" in captured.err
    assert run([*argv, "--no-registry", "--out", str(tmp_path / "m.pt")]) == 2
    assert "--recipe active needs the registry" in capsys.readouterr().err


def test_lesion_painting_options_reach_the_recipe_and_a_bad_one_is_named(tmp_path, capsys) -> None:
    parser = _parser(training=True)
    argv = ["train", str(tmp_path), "--direction", "t1-to-t2"]

    default = train_settings(parser.parse_args(argv))
    assert default.painted_tumour_share == 0.6 and default.lesion_painting == 0.5
    plaques = train_settings(
        parser.parse_args([*argv, "--lesion-painting", "1", "--painted-tumour-share", "0"])
    )
    assert plaques.lesion_painting == 1.0 and plaques.painted_tumour_share == 0.0

    assert run([*argv, "--painted-tumour-share", "1.5", "--registry", str(tmp_path)]) == 2
    assert "painted_tumour_share is a probability, not 1.5" in capsys.readouterr().err


def test_registry_comes_from_the_option_the_config_or_beside_the_config(tmp_path) -> None:
    config = tmp_path / "config.toml"
    assert registry_root(config, None) == tmp_path / "models"  # no file: the default
    config.write_text('[models]\nregistry = "var/models"\n')
    assert registry_root(config, None) == tmp_path / "var" / "models"
    assert registry_root(config, Path("/elsewhere")) == Path("/elsewhere")


def test_list_and_activate_roll_back(tmp_path, capsys) -> None:
    registry = ModelRegistry(tmp_path / "models")
    first = add_version(registry, "t1-to-t2", seed=1)
    second = add_version(registry, "t1-to-t2", seed=2)
    registry.activate("t1-to-t2", "v2")
    where = ["--registry", str(registry.root)]

    assert run(["models", *where]) == 0
    listing = capsys.readouterr().out
    lines = listing.splitlines()
    assert lines[0].startswith("  t1-to-t2 v1") and f"sha256:{first.checksum[:12]}" in lines[0]
    assert lines[2].strip() == "lesions: not measured on patients it never saw"
    assert lines[3].startswith("* t1-to-t2 v2") and f"sha256:{second.checksum[:12]}" in lines[3]
    assert lines[4].strip().startswith("held out: PSNR head 22.00 dB")
    assert "inverted input: 15.00 dB" in lines[4]
    assert lines[5].strip().startswith("lesions: kept 60% to 60% of their real contrast")
    assert lines[-1].startswith("All models: research use, not for diagnosis")

    assert run(["models", "activate", "t1-to-t2", "v1", *where]) == 0
    assert capsys.readouterr().out == "t1-to-t2 v1 is now active\n"
    assert registry.active_version("t1-to-t2") == "v1"
    run(["models", "list", *where])
    assert capsys.readouterr().out.splitlines()[0].startswith("* t1-to-t2 v1")

    assert run(["models", "activate", "t1-to-t2", "v9", *where]) == 1
    assert "no version 'v9' (versions: v1, v2)" in capsys.readouterr().err
    assert registry.active_version("t1-to-t2") == "v1"


def test_a_damaged_version_is_never_activated(tmp_path, capsys) -> None:
    registry = ModelRegistry(tmp_path / "models")
    add_version(registry, "t2-to-t1", seed=1)
    add_version(registry, "t2-to-t1", seed=2)
    registry.activate("t2-to-t1", "v1")
    path = registry.path("t2-to-t1", "v2")
    path.write_bytes(path.read_bytes()[:-200])
    assert run(["models", "activate", "t2-to-t1", "v2", "--registry", str(registry.root)]) == 1
    assert "v2.pt" in capsys.readouterr().err
    assert registry.active_version("t2-to-t1") == "v1"


def test_an_empty_missing_or_misplaced_registry_is_said_so(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert run(["models", "--registry", str(tmp_path / "empty")]) == 0
    assert "no models in" in capsys.readouterr().out
    assert run(["models", "--registry", str(tmp_path / "none")]) == 1
    assert f"the model registry {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert run(["models", "--registry", str(tmp_path / "afile")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(RegistryError, match="is a file, not a folder"):
        ModelRegistry(tmp_path / "afile").active_version("t1-to-t2")


def test_a_damaged_card_or_marker_is_named_not_a_trace(tmp_path, capsys) -> None:
    registry = ModelRegistry(tmp_path / "models")
    add_version(registry, "t1-to-t2", seed=1)
    add_version(registry, "t2-to-t1", seed=1)
    registry.path("t1-to-t2", "v1").with_suffix(".json").write_text("{not json")
    (registry.root / "t2-to-t1" / "ACTIVE").mkdir()

    assert run(["models", "--registry", str(registry.root)]) == 0
    out = capsys.readouterr().out
    assert "t1-to-t2 v1  unreadable:" in out and "is not a readable model card" in out
    assert "t2-to-t1 v1" in out
    with pytest.raises(RegistryError, match="ACTIVE cannot be read"):
        registry.active_version("t2-to-t1")
    with pytest.raises(RegistryError, match="no model file"):
        registry.find(str(tmp_path / "nope.pt"))


def test_train_refuses_bad_settings_before_reading_data(tmp_path, capsys) -> None:
    missing = str(tmp_path / "no-such-data")
    (tmp_path / "afile").write_text("")
    for option, value, message in (
        ("--loss", "l3", "invalid choice"),
        ("--normalization", "zscore", "invalid choice"),
        ("--norm", "group", "norm must be one of"),
        ("--epochs", "0", "epochs must be at least 1, not 0"),
        ("--learning-rate", "-1", "learning_rate must be positive"),
        ("--depth", "40", "channels at the deepest level; at most 4096"),
        ("--reference-metrics", str(tmp_path / "nope.json"), "No such file"),
        # What would be written after hours of training is checked before them.
        ("--out", str(tmp_path), "is a folder; give a file"),
        ("--out", str(tmp_path / "afile" / "m.pt"), "afile is a file, not a folder"),
        ("--checkpoint", str(tmp_path / "afile" / "c.ckpt"), "afile is a file, not a folder"),
    ):
        argv = ["train", missing, "--direction", "t1-to-t2", option, value]
        if message == "invalid choice":
            with pytest.raises(SystemExit):
                run(argv)
        else:
            assert run([*argv, "--registry", str(tmp_path)]) == 2, option
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t1-to-t2").exists()


def test_a_card_without_held_out_figures_says_so(tmp_path, capsys) -> None:
    registry = ModelRegistry(tmp_path / "models")
    card = add_version(registry, "t1-to-t2", seed=1)
    metrics = {"training_data_only": card.metrics["held_out"]}
    registry.write_card("t1-to-t2", dataclasses.replace(card, metrics=metrics))
    assert run(["models", "--registry", str(registry.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "on its own training data, NOT held out: PSNR head 21.00 dB" in lines[1]
    assert lines[2].strip().startswith("held out: no figures on the card")


def test_each_shipped_cards_command_gives_the_recipe_its_card_records() -> None:
    # The cards say how to reproduce the bundled models; the command line must still mean it.
    parser = _parser(training=True)
    cards = sorted((REPO / "models").glob("*/v*.json"))
    assert cards
    for path in cards:
        training = json.loads(path.read_text())["training"]
        args = parser.parse_args(shlex.split(training["command"])[1:])
        assert train_settings(args) == TrainSettings.from_record(training["settings"]), path.name
