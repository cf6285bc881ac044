"""Interop with the reference implementation's state_dict keyspace (world size one, spec section 2).

The key set is derived from the config alone, so both directions check against the reference's layout rather
than against whatever this package's modules happen to be called.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from megalodon.checkpoint import load_state_strict
from megalodon.config import MegalodonConfig
from megalodon.ops.attention import rope_frequencies

TIED = ("embed.weight", "output.output.weight")


def reference_shapes(config: MegalodonConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the reference state_dict for this config, with its shape."""
    d, n, z, v, f, g = (config.model_dim, config.cema_ndim, config.z_dim, config.value_dim,
                        config.ffn_hidden_dim, config.norm_num_groups)

    def timenorm(prefix: str) -> dict:
        return {f"{prefix}.prior_count": (), f"{prefix}.prior_mean": (g,), f"{prefix}.prior_logv": (g,),
                f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}

    shapes = {"embed.weight": (config.vocab_size, d), "rope.freqs": (config.head_z_dim // 2,)}
    for i in range(config.num_layers):
        m, ffn = f"layers.{i}.mega", f"layers.{i}.nffn"
        shapes.update(timenorm(f"{m}.timenorm"))
        shapes.update({f"{m}.cema.alpha": (d, n, 1), f"{m}.cema.delta": (d, n, 1), f"{m}.cema.theta": (d, 1, 1),
                       f"{m}.cema.gamma": (d, n, 2), f"{m}.cema.omega": (d, 1)})
        if config.norm_affine:
            shapes[f"{m}.rmsnorm.weight"] = (d,)
        for name, (rows, cols) in {"wz": (z, d), "wv": (v, d), "wr": (v, d), "wh1": (d, d)}.items():
            shapes[f"{m}.{name}.weight"] = (rows, cols)
            shapes[f"{m}.{name}.bias"] = (rows,)
        shapes.update({f"{m}.wh2.weight": (d, v), f"{m}.gamma": (2, z), f"{m}.beta": (2, z),
                       f"{ffn}.fc1.weight": (f, d), f"{ffn}.fc2.weight": (d, f)})
        if config.norm_affine:  # the reference builds the FFN LayerNorm with elementwise_affine=norm_affine
            shapes.update({f"{ffn}.norm.weight": (d,), f"{ffn}.norm.bias": (d,)})
        if config.swiglu:
            shapes[f"{ffn}.fc3.weight"] = (f, d)
        if config.rescale_nffn:
            shapes[f"{ffn}.alpha"] = (d,)
    shapes.update(timenorm("output.final_norm"))
    shapes["output.output.weight"] = (config.num_outputs, d)
    return shapes


def to_reference(model) -> dict[str, Tensor]:
    """Export to the reference keyspace: exactly its keys, both embedding keys when tied."""
    ours = model.state_dict()
    expected = reference_shapes(model.config)
    return {key: ours[key].detach().clone() for key in expected}


def from_reference(state_dict: dict[str, Tensor], config: MegalodonConfig):
    """Build a Megalodon from a reference state_dict, refusing any key, shape or value that does not fit."""
    from megalodon.model import Megalodon

    expected = reference_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unknown = sorted(set(state_dict) - set(expected))
    if missing or unknown:
        raise ValueError(f"the reference state_dict does not match the config: missing {missing[:8]}, "
                         f"unknown {unknown[:8]}")
    for key, shape in expected.items():
        found = tuple(state_dict[key].shape)
        if found != shape:
            raise ValueError(f"reference key {key} has shape {found}, the config implies {shape}")
    freqs = rope_frequencies(config.head_z_dim, config.rope_theta).float()
    if not torch.allclose(state_dict["rope.freqs"].float(), freqs, rtol=1e-5):
        raise ValueError("reference rope.freqs do not match the config's rope_base "
                         f"({config.rope_theta}); set rope_base to the value the checkpoint was trained with")
    for key in (k for k in state_dict if k.endswith("prior_count")):
        if int(state_dict[key]) != 0:
            raise ValueError(f"{key} = {int(state_dict[key])}: learned TimestepNorm priors (count > 0) are not "
                             "supported by the model (the reference config never sets them)")
    tensors = dict(state_dict)
    if config.share_emb:
        if not torch.equal(tensors["embed.weight"], tensors["output.output.weight"]):
            raise ValueError("share_emb is set but embed.weight and output.output.weight differ")
        tensors.pop("output.output.weight")
    model = Megalodon(config)
    load_state_strict(model, tensors, "reference state_dict")
    return model


def read_reference_file(path: str | Path) -> dict[str, Tensor]:
    """Load a reference .pth safely (weights_only) or a .safetensors file; unwrap a {'model': ...} dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols mean nothing to the user
            warnings.simplefilter("ignore")
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe pickles
        # torch's own advice (allow-list a global, or weights_only=False) runs the file's code: keep its first
        # sentence alone.
        detail = str(err).split("WeightsUnpickler error:")[-1].strip()
        reason = detail.splitlines()[0].split(". ")[0].rstrip(".") if detail else ""
        raise ValueError(f"{path} could not be read as a weights-only checkpoint of tensors ({type(err).__name__}"
                         f"{': ' + reason if reason else ''}); it is damaged, not a torch checkpoint, or holds "
                         "Python objects, which are never loaded (they could run code). Save the reference "
                         "model's state_dict of tensors alone, or as .safetensors") from None
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return loaded
