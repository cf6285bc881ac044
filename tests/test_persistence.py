"""save_pretrained / from_pretrained, the state's safetensors files, and reference-keyspace conversion."""

import pytest
import torch

from helpers import edit_safetensors, tiny_config, tiny_model
from megalodon import Megalodon, MegalodonState
from megalodon.convert import from_reference, reference_shapes, to_reference


@pytest.mark.parametrize("share_emb", [False, True])
def test_save_and_load_are_bit_exact(tmp_path, share_emb):
    model = tiny_model(torch.float32, share_emb=share_emb, swiglu=True, rescale_nffn=True)
    model.save_pretrained(tmp_path)
    loaded = Megalodon.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 64, (2, 20))
    assert torch.equal(model(ids), loaded.eval()(ids))
    if share_emb:
        assert loaded.output.output.weight is loaded.embed.weight


@pytest.mark.filterwarnings("ignore:.*has no checksums")
def test_loading_refuses_missing_unknown_and_misshapen_keys(tmp_path):
    model_dir, original = tmp_path / "model", tmp_path / "original.safetensors"
    tiny_model(torch.float32).save_pretrained(model_dir)
    (model_dir / "checksums.json").unlink()  # else the checksum refuses the edited file before the key check
    (model_dir / "model.safetensors").rename(original)
    for change, message in [
        (lambda t: t.pop("layers.0.mega.wz.weight"), "missing key.*layers.0.mega.wz.weight"),
        (lambda t: t.update(extra=torch.zeros(1)), "unknown key.*extra"),
        (lambda t: t.update({"layers.1.mega.cema.alpha": torch.zeros(3, 3, 1)}), "layers.1.mega.cema.alpha"),
    ]:
        edit_safetensors(original, change, out=model_dir / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            Megalodon.from_pretrained(model_dir)


def test_truncated_weights_are_refused(tmp_path):
    tiny_model(torch.float32).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="does not match the checksum"):
        Megalodon.from_pretrained(tmp_path)
    (tmp_path / "checksums.json").unlink()
    with pytest.raises(ValueError, match="truncated or corrupt"), pytest.warns(UserWarning, match="no checksums"):
        Megalodon.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        Megalodon.from_pretrained(tmp_path)


def test_state_save_load_round_trip(tmp_path):
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 64, (2, 13))
    _, state = model(ids[:, :9], return_state=True)
    state.save(tmp_path / "s.safetensors", model.config)
    loaded = MegalodonState.load(tmp_path / "s.safetensors", model.config)
    assert loaded.nbytes == state.nbytes
    assert torch.equal(model(ids[:, 9:], state=loaded), model(ids[:, 9:], state=state))
    other = tiny_model(torch.float32, model_dim=48).config
    with pytest.raises(ValueError, match="different config"):
        MegalodonState.load(tmp_path / "s.safetensors", other)


def test_state_indexing_detach_and_to():
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 64, (3, 11))
    _, state = model(ids[:, :6], return_state=True)
    row = state[1]
    assert row.batch_size == 1
    torch.testing.assert_close(model(ids[1:2, 6:], state=row), model(ids[:, 6:], state=state)[1:2])
    moved = state.detach().to("cpu")
    assert moved.layers[0].cema_h.dtype == torch.complex64 and not moved.layers[0].cema_h.requires_grad


def test_reference_keyspace_round_trip_is_bit_exact():
    for overrides in (dict(), dict(share_emb=True, swiglu=True), dict(rescale_nffn=True, norm_affine=False)):
        model = tiny_model(torch.float32, **overrides)
        exported = to_reference(model)
        assert set(exported) == set(reference_shapes(model.config))
        assert "rope.freqs" in exported and "output.final_norm.prior_logv" in exported
        for key in ("layers.0.mega.rmsnorm.weight", "layers.1.nffn.norm.weight", "layers.1.nffn.norm.bias"):
            assert (key in exported) == model.config.norm_affine, key  # the reference's norm_affine drops all three
        back = from_reference(exported, model.config).eval()
        for key, value in to_reference(back).items():
            assert torch.equal(value, exported[key]), key
        ids = torch.randint(0, 64, (2, 17))
        assert torch.equal(back(ids), model(ids))


def test_reference_import_refuses_mismatches():
    model = tiny_model(torch.float32, share_emb=True)
    exported = to_reference(model)
    broken = dict(exported)
    broken["output.output.weight"] = broken["output.output.weight"] + 1
    with pytest.raises(ValueError, match="differ"):
        from_reference(broken, model.config)
    with pytest.raises(ValueError, match="missing"):
        from_reference({k: v for k, v in exported.items() if k != "embed.weight"}, model.config)
    with pytest.raises(ValueError, match="rope_base"):
        from_reference(exported, tiny_config(share_emb=True, rope_base=500.0))


def test_reference_file_loads_weights_only(tmp_path):
    from megalodon.convert import read_reference_file

    model = tiny_model(torch.float32)
    torch.save({"model": to_reference(model)}, tmp_path / "ref.pth")
    assert set(read_reference_file(tmp_path / "ref.pth")) == set(reference_shapes(model.config))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        read_reference_file(tmp_path / "evil.pth")


def test_state_file_carries_extra_tensors_and_refuses_clashes(tmp_path):
    from safetensors import safe_open

    model = tiny_model(torch.float32)
    _, state = model(torch.randint(0, 64, (1, 5)), return_state=True)
    state.save(tmp_path / "s.safetensors", model.config, extra_tensors={"note": torch.arange(3)},
               extra_metadata={"who": "test"})
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as handle:
        assert handle.metadata()["who"] == "test" and torch.equal(handle.get_tensor("note"), torch.arange(3))
    assert MegalodonState.load(tmp_path / "s.safetensors", model.config).nbytes == state.nbytes
    with pytest.raises(ValueError, match="overwrite"):
        state.save(tmp_path / "t.safetensors", extra_tensors={"position": torch.zeros(1)})
