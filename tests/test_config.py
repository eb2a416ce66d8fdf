"""Configuration: presets with "extends", flags over files, clear refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import CONFIG_DIR, FP8TrainConfig, TrainConfig, load_config_file, parse_args, save_config
from common.errors import UserError


def test_flags_override_file_and_file_overrides_defaults() -> None:
    cfg, _ = parse_args(["--config", "configs/tiny_cpu.json", "--n_layer", "2", "--max_steps=7"])
    assert cfg.n_layer == 2 and cfg.max_steps == 7
    assert cfg.n_embd == 128  # from tiny_cpu.json
    assert cfg.weight_decay == 0.1  # from base.json through "extends"
    assert cfg.checkpoint_dir == "./checkpoints"  # dataclass default


def test_booleans_take_a_bare_flag_or_a_value() -> None:
    cfg, _ = parse_args(["--use_tensorboard", "--compile", "false", "--async_checkpoint", "no"])
    assert cfg.use_tensorboard is True and cfg.compile is False and cfg.async_checkpoint is False
    assert parse_args([])[0].compile is None  # auto
    assert parse_args(["--compile", "auto"])[0].compile is None


def test_every_field_is_a_flag() -> None:
    for name in TrainConfig.__dataclass_fields__:
        value = getattr(TrainConfig(), name)
        flag_value = "auto" if value is None else str(value)
        cfg, _ = parse_args([f"--{name}", flag_value] if flag_value else [f"--{name}="])
        assert getattr(cfg, name) == value


@pytest.mark.parametrize("argv, fragment", [
    (["--n_layr", "2"], "unknown flag --n_layr (did you mean --n_layer?)"),
    (["--batch_size", "x"], "--batch_size takes an integer"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda, mps"),
    (["--compile", "maybe"], "--compile takes true or false"),
    (["--n_embd", "100", "--n_head", "3"], "divisible by --n_head"),
    (["--config", "no_such_preset"], "config file not found"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["positional"], "unexpected argument"),
])
def test_mistakes_are_one_clear_line(argv: list[str], fragment: str) -> None:
    with pytest.raises(UserError) as err:
        parse_args(argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_file_names_file_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"extends": "tiny_cpu.json", "lerning_rate": 1e-3}))
    expected = r"unknown config key 'lerning_rate' in .*c.json \(did you mean learning_rate\?\)"
    with pytest.raises(UserError, match=expected):
        parse_args(["--config", str(path)])


def test_extends_chain_and_loop(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"extends": "b.json", "n_layer": 3}))
    (tmp_path / "b.json").write_text(json.dumps({"extends": str(CONFIG_DIR / "tiny_cpu.json"), "n_head": 2}))
    merged = load_config_file(str(tmp_path / "a.json"))
    assert merged["n_layer"] == 3 and merged["n_head"] == 2 and merged["block_size"] == 128
    (tmp_path / "b.json").write_text(json.dumps({"extends": "a.json"}))
    with pytest.raises(UserError, match="loop"):
        load_config_file(str(tmp_path / "a.json"))


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg, _ = parse_args(["--config", "tiny_cpu", "--seed", "5"])
    save_config(cfg, tmp_path / "saved.json")
    again, _ = parse_args(["--config", str(tmp_path / "saved.json")])
    assert again == cfg


def test_presets_are_valid() -> None:
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cls = FP8TrainConfig if "fp8" in path.name else TrainConfig
        cfg, _ = parse_args(["--config", str(path)], cls)
        assert cfg.total_batch_size % (cfg.batch_size * cfg.block_size) == 0, path.name


def test_fp8_config_defaults_to_its_own_checkpoint_dir() -> None:
    assert parse_args([], FP8TrainConfig)[0].checkpoint_dir == "./checkpoints_fp8"
    with pytest.raises(UserError, match="unknown flag --use_fp8"):
        parse_args(["--use_fp8"], TrainConfig)
