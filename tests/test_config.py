"""The one typed config: presets load, overrides apply with types, bad keys and types are named."""

from __future__ import annotations

import pytest

from llm.cli.main import main as kiln
from llm.config import ConfigError, list_presets, load_config


@pytest.mark.parametrize("preset", ["tiny", "d12", "d20"])
def test_presets_load(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert cfg.dedup.num_bands * cfg.dedup.rows_per_band == 112


def test_presets_are_the_documented_ones() -> None:
    assert {"tiny", "d12", "d20"} <= set(list_presets())


def test_depth_series_follows_nanochat() -> None:
    assert load_config("d12").model.depth == 12
    assert load_config("d20").model.depth == 20


def test_overrides_parse_types() -> None:
    cfg = load_config("tiny", ["pretrain.lr=1e-3", "pretrain.compile=true", "download.max_files=null",
                               "eval.stages=[pretrain, sft]"])
    assert cfg.pretrain.lr == pytest.approx(1e-3)
    assert cfg.pretrain.compile is True
    assert cfg.download.max_files is None
    assert cfg.eval.stages == ["pretrain", "sft"]


def test_dict_overrides() -> None:
    assert load_config("tiny", {"model.depth": 3}).model.depth == 3


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.lrr.*'lrr' is not a field of pretrain"):
        load_config("tiny", ["pretrain.lrr=1"])


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match="'pretrian' is not a field of <top level>"):
        load_config("tiny", ["pretrian.lr=1"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.lr: Input should be a valid number"):
        load_config("tiny", ["pretrain.lr=fast"])


def test_unknown_key_in_yaml_is_named(tmp_path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("model:\n  depht: 3\n")
    with pytest.raises(ConfigError, match=r"model\.depht: unknown key"):
        load_config(str(p))


def test_bad_force_stage() -> None:
    with pytest.raises(ConfigError, match="unknown stages"):
        load_config("tiny", ["orchestration.force=[pretrainn]"])


def test_eval_stages_must_name_model_stages() -> None:
    # The registry says which stages make a model; a data stage is refused like a misspelt name.
    with pytest.raises(ConfigError, match=r"eval\.stages\.1: Input should be 'pretrain', 'midtrain' or 'sft' \(got 'tokenize'\)"):
        load_config("tiny", ["eval.stages=[pretrain, tokenize]"])
    assert load_config("tiny", ["eval.stages=[sft]"]).eval.stages == ["sft"]


def test_cli_rejects_bad_key_before_compute(capsys) -> None:
    assert kiln(["pretrain", "--set", "pretrain.nope=1"]) == 2
    assert "unknown config key 'pretrain.nope'" in capsys.readouterr().err


def test_cli_config_prints_resolved(capsys) -> None:
    assert kiln(["config", "--set", "model.depth=5"]) == 0
    assert '"depth": 5' in capsys.readouterr().out


@pytest.mark.parametrize("override", ["download.max_files=-1", "download.max_files=0", "download.max_rows=0"])
def test_download_budgets_must_be_positive(override: str) -> None:
    """max_files=-1 would silently drop the last file (files[:-1]); 0 would download nothing."""
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("tiny", [override])


def test_cli_set_takes_several_overrides_at_once(capsys) -> None:
    assert kiln(["config", "--set", "model.depth=5", "download.max_rows=300", "--set", "pretrain.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert '"depth": 5' in out and '"max_rows": 300' in out and '"lr": 0.01' in out
