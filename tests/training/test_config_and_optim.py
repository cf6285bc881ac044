import math

import pytest
import torch

from helpers import tiny_model
from megalodon.training.config import TrainConfig, apply_overrides, read_config_file
from megalodon.training.optim import build_optimizer, lr_at, parameter_groups


def test_overrides_coerce_types_and_reach_model_fields():
    values = apply_overrides({}, ["--lr", "3e-4", "--compile=true", "--model.chunk_size", "64", "--max_steps", "9",
                                  "--model.rope_base", "500"])
    cfg = TrainConfig.from_dict(values)
    assert cfg.lr == 3e-4 and cfg.compile is True and cfg.max_steps == 9
    assert cfg.model == {"chunk_size": 64, "rope_base": 500.0}


@pytest.mark.parametrize("args, message", [
    (["--learning_rate", "1"], "unknown training option 'learning_rate'"),
    (["--seq_lne", "5"], "did you mean 'seq_len'"),
    (["--model.chunk_sise", "5"], "did you mean 'chunk_size'"),
    (["--lr", "fast"], "expects a number"),
    (["--lr"], "needs a value"),
])
def test_bad_overrides_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides({}, args)


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(max_steps=1, batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig()
    with pytest.raises(ValueError, match="did you mean 'warmup_steps'"):
        TrainConfig.from_dict({"warmup_step": 3})


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nmax_steps = 3\n[model]\nchunk_size = 16\n')
    cfg = TrainConfig.from_dict(apply_overrides(read_config_file(path), ["--seq_len", "32"]))
    assert cfg.preset == "tiny" and cfg.model == {"chunk_size": 16} and cfg.seq_len == 32


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3)
    assert math.isclose(lr_at(0, cfg, 100), 1e-7)
    assert math.isclose(lr_at(10, cfg, 100), 1e-3)
    assert math.isclose(lr_at(100, cfg, 100), 1e-5)
    cosine = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine")
    assert math.isclose(lr_at(55, cosine, 100), 1e-3 * (0.01 + 0.99 * 0.5))


def test_no_weight_decay_on_norms_biases_and_cema():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "layers.0.mega.wz.weight" in decayed and "embed.weight" in decayed
    assert not any("cema" in n or "norm" in n or n.endswith("bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_optimizer_is_fused_where_torch_has_the_kernel_and_steps_like_the_multi_tensor_one():
    """One fused kernel for every parameter (its step counts on the device, which the multi-tensor path reads on
    the host every step), with the same parameter groups and the same update up to rounding."""
    cfg = TrainConfig(preset="tiny", lr=1e-2, weight_decay=0.1, max_steps=1)
    fused_model, plain_model = tiny_model(), tiny_model()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    plain = type(fused)(parameter_groups(plain_model, 0.1), lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                        foreach=True)
    for step in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            torch.manual_seed(step)
            for param in model.parameters():
                param.grad = torch.randn_like(param)
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values, message", [
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(stateful="no"), "stateful must be true or false, got 'no'"),
    (dict(keep_checkpoints=2.5), "keep_checkpoints must be an integer, got 2.5"),
    (dict(eval_batch_size="four"), "eval_batch_size must be an integer, got 'four'"),
    (dict(model=5), "model must be a table of model-field overrides, got 5"),
    (dict(model={"swiglu": "no"}), "MegalodonConfig.swiglu must be true or false"),
    (dict(model={"chunk_sise": 4}), "did you mean 'chunk_size'"),
    (dict(preset="smal"), "did you mean 'small'"),
    (dict(lr=float("inf")), "lr must be a finite number, got inf"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr="1e-3"), "lr must be a number, got '1e-3'.*without quotes"),
    (dict(data=5), "data must be a string"),
    (dict(sample_prompt=""), "sample_prompt must be non-empty"),
    (dict(sample_tokens=0), "sample_tokens must be >= 1"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(threads=-2), "threads must be >= 0"),
])
def test_every_field_is_checked_for_type_and_range(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"max_steps": 1, **values})


def test_config_files_are_validated_like_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 3\nstateful = "no"\n')
    with pytest.raises(ValueError, match="stateful must be true or false"):
        TrainConfig.from_dict(apply_overrides(read_config_file(path), []))
    path.write_text("max_steps = 3\nmodel = 5\n")
    with pytest.raises(ValueError, match="model must be a table"):
        TrainConfig.from_dict(apply_overrides(read_config_file(path), []))


@pytest.mark.parametrize("name, text, message", [
    ("list.json", "[1, 2]", r"list.json must hold a table of options \(key = value\), found a list"),
    ("bad.json", "{", r"bad.json is not valid JSON"),
    ("bad.toml", "lr = = 3", r"bad.toml is not valid TOML"),
])
def test_malformed_config_files_are_named(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config_file(tmp_path / name)


def test_an_extension_continues_the_decay_from_where_it_stands():
    cfg = TrainConfig(max_steps=30, warmup_steps=10, lr=1e-3)
    at_20 = lr_at(20, cfg, 30)
    assert math.isclose(lr_at(20, cfg, 40, restart=(20, at_20)), at_20)  # no jump at the extension
    assert math.isclose(lr_at(40, cfg, 40, restart=(20, at_20)), 1e-5)  # and the same floor at the new end
    assert math.isclose(lr_at(35, cfg, 40, restart=(30, 1e-5)), 1e-5)  # a finished run stays at its floor


@pytest.mark.parametrize("capability, hip, fast", [((7, 0), None, False), ((7, 5), None, False),
                                                   ((8, 0), None, True), ((9, 0), None, True),
                                                   ((9, 0), "6.2", True)],
                         ids=["V100", "T4", "A100", "H100", "ROCm"])
def test_auto_dtype_picks_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, capability, hip, fast):
    """A V100 or T4 runs bf16 emulated, several times slower than fp32, though is_bf16_supported() says yes."""
    import torch

    from megalodon.precision import fast_bf16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert fast_bf16(torch.device("cuda")) is fast
