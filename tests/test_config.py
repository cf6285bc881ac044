import pytest
import torch

from megalodon import PRESETS, Megalodon, MegalodonConfig, count_parameters


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_count_parameters_agrees_with_the_model(preset):
    assert count_parameters(preset) == Megalodon(MegalodonConfig.from_preset(preset)).num_parameters()


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"tiny", "small", "base"}))
def test_count_parameters_agrees_for_reference_presets(preset):
    with torch.device("meta"):
        model = Megalodon(MegalodonConfig.from_preset(preset))
    assert count_parameters(preset) == model.num_parameters()


def test_small_presets_have_their_advertised_sizes():
    assert count_parameters("tiny") < 1_000_000
    assert 4e6 < count_parameters("small") < 7e6
    assert 15e6 < count_parameters("base") < 25e6


def test_mega7b_count_matches_the_spec():
    assert abs(count_parameters("mega7.1B", vocab_size=32000) - 7.12e9) < 0.01e9


def test_paper7b_preset():
    cfg = MegalodonConfig.from_preset("paper7B")
    assert cfg.chunk_size == 4096 and cfg.rope_theta == 100000.0 and cfg.swiglu


@pytest.mark.parametrize("overrides, field", [
    (dict(z_dim=30, num_heads=4), "z_dim"),
    (dict(value_dim=130, num_heads=4), "value_dim"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(model_dim=66), "model_dim"),
    (dict(z_dim=24, num_heads=8), "must be even"),
    (dict(dropout=1.0), "dropout"),
    (dict(init_mode="none"), "init_mode"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(output_size=10, share_emb=True), "share_emb"),
])
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MegalodonConfig.from_preset("tiny", **overrides)


def test_unknown_field_and_preset_suggest_the_closest():
    with pytest.raises(ValueError, match="did you mean 'chunk_size'"):
        MegalodonConfig.from_preset("tiny", chunk_sise=4)
    with pytest.raises(ValueError, match="did you mean 'small'"):
        MegalodonConfig.from_preset("smal")


def test_json_round_trip(tmp_path):
    from megalodon.checkpoint import read_config, write_config

    cfg = MegalodonConfig.from_preset("small", rope_base=500.0)
    write_config(cfg, tmp_path / "c.json")
    assert read_config(tmp_path / "c.json") == (cfg, Megalodon)


@pytest.mark.parametrize("overrides, message", [
    (dict(swiglu="no"), "swiglu must be true or false, got 'no'"),
    (dict(norm_eps=float("inf")), "norm_eps must be a finite number"),
    (dict(dropout="x"), "dropout must be a number"),
    (dict(init_mode=3), "init_mode must be a string, got 3"),
    (dict(rope_base="big"), "rope_base must be a number or None"),
    (dict(num_layers=2.0), "num_layers must be an integer, got 2.0"),
])
def test_field_types_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        MegalodonConfig.from_preset("tiny", **overrides)


def test_a_preset_that_looks_like_a_path_says_the_file_is_missing():
    with pytest.raises(FileNotFoundError, match=r"no config file at '/missing.json' \(and it is not a preset"):
        MegalodonConfig.from_preset("/missing.json")
