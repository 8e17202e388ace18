"""Reading and writing RWKV-4 weights: transformers checkpoint directories and BlinkDL
``.pth`` files. Weights are read from the files, never from a live transformers model:
transformers divides some weights in place when its model enters eval mode with
``rescale_every > 0``, so a live model's tensors may not be the checkpoint's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from prosg.models.config import RWKV4Config

_HF_PREFIX = "rwkv."
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_read_file(directory / shard))
            return state
        return _read_file(path)
    raise FileNotFoundError(f"{directory}: no weights found; looked for {', '.join(_WEIGHT_FILES)}")


def _load_into(cls, config: RWKV4Config, state: dict[str, Tensor], dtype: torch.dtype | None,
               device: torch.device | str, source: str):
    """Builds the model on the meta device (no initialisation cost) and assigns the
    tensors of ``state`` (keys without the ``rwkv.`` prefix), checking names and shapes."""
    with torch.device("meta"):
        model = cls(config, init=False)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.setdefault("head.weight", state.get("embeddings.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match an RWKV-4 model of {config.num_hidden_layers} layers; "
                         f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    for key, param in expected.items():
        t = state[key]
        if t.shape != param.shape:
            # BlinkDL and some converters store the time_* vectors squeezed.
            if key.rsplit(".", 1)[-1].startswith("time_") and t.numel() == param.numel():
                state[key] = t.reshape(param.shape)
            else:
                raise ValueError(f"{source}: {key} has shape {list(t.shape)}, expected {list(param.shape)}")
        if not state[key].is_floating_point():
            raise ValueError(f"{source}: {key} must be floating point, got {state[key].dtype}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.head.weight = model.embeddings.weight
    # One activation dtype for the whole model (mixed files exist: float16 matrices
    # with float32 LayerNorms); time_decay / time_first stay float32 for 16-bit.
    model.to_dtype(dtype if dtype is not None else model.embeddings.weight.dtype)
    return model.to(device).eval()


def load_hf(cls, path: str | Path, *, dtype: torch.dtype | None, device: torch.device | str):
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected a transformers RWKV-4 checkpoint directory)")
    config = RWKV4Config.from_dict(json.loads(config_file.read_text()))
    raw = _read_hf_weights(directory)
    state = {k.removeprefix(_HF_PREFIX): v for k, v in raw.items()}
    return _load_into(cls, config, state, dtype, device, str(directory))


def save_hf(model, path: str | Path) -> None:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "head.weight":
            if tied:
                continue  # safetensors refuses shared storage; transformers re-ties on load
            tensors[key] = t.detach().cpu().contiguous()
        else:
            tensors[_HF_PREFIX + key] = t.detach().cpu().contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_dict(dtype=model.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def blinkdl_to_hf_name(name: str) -> str:
    """A BlinkDL RWKV-4 parameter name in transformers' spelling (without ``rwkv.``),
    as ``convert_rwkv_checkpoint_to_hf.py`` renames it."""
    if name.startswith("emb."):
        name = "embeddings." + name[len("emb."):]
    if name.startswith("blocks.0.ln0."):
        name = "blocks.0.pre_ln." + name[len("blocks.0.ln0."):]
    name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
    name = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
    for short, long in (("k", "key"), ("v", "value"), ("r", "receptance")):
        if name.endswith(f".time_mix_{short}"):
            name = name[: -len(short)] + long
    return name


def load_blinkdl(cls, path: str | Path, *, dtype: torch.dtype | None, device: torch.device | str,
                 **config_overrides):
    path = Path(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a BlinkDL RWKV-4 state dict (name -> tensor)")
    state = {blinkdl_to_hf_name(k): v for k, v in raw.items()}
    for needed in ("embeddings.weight", "blocks.0.attention.key.weight", "blocks.0.feed_forward.key.weight"):
        if needed not in state:
            raise ValueError(f"{path}: not an RWKV-4 checkpoint (no {needed!r} after renaming BlinkDL keys)")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    vocab, hidden = state["embeddings.weight"].shape
    shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                 attention_hidden_size=state["blocks.0.attention.key.weight"].shape[0],
                 intermediate_size=state["blocks.0.feed_forward.key.weight"].shape[0])
    clash = sorted(set(shape) & set(config_overrides))
    if clash:
        raise ValueError(f"from_blinkdl: {clash} are read from the checkpoint's tensors and cannot be overridden")
    try:
        config = RWKV4Config(**shape, **config_overrides)
    except TypeError as e:
        raise TypeError(f"from_blinkdl: bad config override: {e}") from None
    return _load_into(cls, config, state, dtype, device, str(path))
