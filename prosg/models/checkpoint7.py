"""Reading and writing RWKV-7 weights: BlinkDL x070 ``.pth`` files and
flash-linear-attention (fla, ``RWKV7ForCausalLM``) checkpoint directories.

Name mapping (ours <-> BlinkDL <-> fla; ``i`` the block, ``p`` one of ``w, a, v, g``;
docs/rwkv7.md has the table with shapes):

* ``embeddings.weight`` <-> ``emb.weight`` <-> ``model.embeddings.weight``
* ``blocks.0.ln0.*`` <-> ``blocks.0.ln0.*`` <-> ``model.layers.0.pre_norm.*``;
  ``ln1`` <-> ``attn_norm``, ``ln2`` <-> ``ffn_norm``
* ``blocks.i.attention.{receptance,key,value,output}.weight`` <-> ``blocks.i.att.*`` <->
  ``model.layers.i.attn.{r,k,v,o}_proj.weight``
* ``attention.x_{r,w,k,v,a,g}`` ``[H]`` <-> ``[1, 1, H]`` in both files
* ``attention.p0`` ``[H]`` <-> ``att.p0 [1, 1, H]`` <-> ``attn.p_lora.lora.2.bias [H]``
  (no ``g0``); ``attention.p1 [H, D]`` <-> ``att.p1 [H, D]`` <->
  ``attn.p_lora.lora.0.weight [D, H]`` (transposed: an ``nn.Linear(H, D)``);
  ``attention.p2 [D, H]`` <-> ``att.p2`` <-> ``attn.p_lora.lora.2.weight [H, D]``
  (transposed). Layer 0 has no ``v`` LoRA (BlinkDL files may hold unused
  ``blocks.0.att.v0/v1/v2``: accepted and dropped, as the rwkv package ignores them).
* ``attention.{k_k,k_a}`` ``[H]`` <-> ``[1, 1, H]`` <-> ``[H]``; ``attention.r_k``
  ``[heads, N]`` everywhere
* ``attention.ln_x.*`` <-> ``att.ln_x.*`` <-> ``attn.g_norm.*``
* ``feed_forward.x_k`` ``[H]`` <-> ``ffn.x_k [1, 1, H]`` <-> ``ffn.x_k [H]``;
  ``feed_forward.{key,value}.weight`` <-> ``ffn.*`` <-> ``ffn.*``
* ``ln_out.*`` <-> ``ln_out.*`` <-> ``model.norm.*``; ``head.weight`` <-> ``head.weight``
  <-> ``lm_head.weight``
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from prosg.models.checkpoint import (
    _check_load_args,
    _dtype_names,
    _names,
    _ranges,
    _read_file,
    _read_hf_weights,
    _read_json,
)
from prosg.models.checks import MODEL_DTYPES
from prosg.models.config import RWKV7Config

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
#: Parameters stored flat ``[H]`` here and ``[1, 1, H]`` in BlinkDL files.
_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
#: DeepEmbed (RWKV-7 "G1" DE) channel-mix extras the model does not implement.
_DEEP_EMBED = re.compile(r"\.(s_emb|s_emb_x|s0|s1|s2)(\.|$)")
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "intermediate_size",
                 "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")


def _shape_desc(config: RWKV7Config) -> str:
    return ", ".join(f"{f}={getattr(config, f)}" for f in _SHAPE_FIELDS)


def _block_of(key: str) -> int | None:
    m = _BLOCK.match(key)
    return int(m.group(1)) if m else None


def _assign(cls, config: RWKV7Config, state: dict[str, Tensor], dtype, device, source: str, *,
            config_source: str, spell=lambda k: k, unexpected_extra: list[str] | None = None):
    """Builds the model on the meta device and assigns ``state`` (our names) after
    checking every expected key is present with its shape and a floating dtype and
    nothing else is; all problems in one ValueError naming ``source``. ``spell`` maps
    our key to the file's spelling for the message."""
    with torch.device("meta"):
        model = cls(config, init=False)
    expected = model.state_dict()
    if config.tie_word_embeddings and "embeddings.weight" in state:
        state.setdefault("head.weight", state["embeddings.weight"])
    L = config.num_hidden_layers
    in_file = {b for k in state if (b := _block_of(k)) is not None}
    absent = sorted(set(range(L)) - in_file)
    beyond = sorted(in_file - set(range(L)))
    missing = [spell(k) for k in expected if k not in state and _block_of(k) not in absent]
    missing += [spell(f"blocks.{i}.*") for i in absent]
    unexpected = [spell(k) for k in state if k not in expected and _block_of(k) not in beyond]
    unexpected += [spell(f"blocks.{i}.*") for i in beyond] + list(unexpected_extra or [])
    misshaped, not_float = [], []
    for key, param in expected.items():
        t = state.get(key)
        if t is None:
            continue
        if t.shape != param.shape:
            leaf = key.rsplit(".", 1)[-1]
            if leaf in _VECTORS and param.dim() == 1 and t.numel() == param.numel() and \
                    all(s == 1 for s in t.shape[:-1]):
                state[key] = t = t.reshape(param.shape)
            else:
                misshaped.append(f"{spell(key)}: {list(t.shape)} (expected {list(param.shape)})")
        if not t.is_floating_point():
            not_float.append(f"{spell(key)}: {t.dtype}")
    if missing or unexpected or misshaped or not_float:
        problems = []
        if missing or unexpected:
            problems.append(f"missing {_names(missing) if missing else 'none'}, "
                            f"unexpected {_names(unexpected) if unexpected else 'none'}")
        if absent:
            problems.append(f"blocks {_ranges(absent)} of the {L} layers are absent entirely")
        if beyond:
            problems.append(f"the file holds blocks {_ranges(beyond)} beyond the {L} layers")
        if misshaped:
            problems.append(f"mis-shaped: {'; '.join(misshaped)}")
        if not_float:
            problems.append(f"not floating point: {'; '.join(not_float)}")
        raise ValueError(f"{source}: the weights do not match an RWKV-7 model of {L} layers ({config_source}; "
                         f"{_shape_desc(config)}): {'; '.join(problems)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.head.weight = model.embeddings.weight
    if dtype is None:
        dtype = model.embeddings.weight.dtype
        if dtype not in MODEL_DTYPES:
            raise ValueError(f"{source}: the weights are stored in {dtype}, which the model cannot run in; "
                             f"pass dtype= one of {_dtype_names()}")
    model.to_dtype(dtype)
    return model.to(device).eval()


# ---------------------------------------------------------------------- BlinkDL


def blinkdl_to_ours(name: str) -> str:
    if name == "emb.weight":
        return "embeddings.weight"
    name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
    return re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)


def ours_to_blinkdl(name: str) -> str:
    if name == "embeddings.weight":
        return "emb.weight"
    name = re.sub(r"^blocks\.(\d+)\.attention\.", r"blocks.\1.att.", name)
    return re.sub(r"^blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn.", name)


def to_blinkdl(model) -> dict[str, Tensor]:
    """The model's weights under BlinkDL's names and shapes (vectors ``[1, 1, H]``)."""
    out = {}
    for key, value in model.state_dict().items():
        t = value.detach().clone()
        if key.rsplit(".", 1)[-1] in _VECTORS:
            t = t.reshape(1, 1, -1)
        out[ours_to_blinkdl(key)] = t
    return out


def load_blinkdl7(cls, path: str | Path, *, dtype, device, **config_overrides):
    device = _check_load_args("from_blinkdl", dtype, device)
    path = Path(path)
    raw = _read_file(path)
    deep = [k for k in raw if _DEEP_EMBED.search(k)]
    if deep:
        raise ValueError(f"{path}: a DeepEmbed RWKV-7 checkpoint (keys {_names(deep)}) is not supported: "
                         "RWKV7LM implements the plain x070 channel mix")
    for needed, dims in (("emb.weight", 2), ("blocks.0.att.r_k", 2), ("blocks.0.ffn.key.weight", 2),
                         ("blocks.0.att.w1", 2), ("blocks.0.att.a1", 2), ("blocks.0.att.g1", 2)):
        if needed not in raw:
            raise ValueError(f"{path}: not an RWKV-7 (x070) checkpoint: no {needed!r}")
        if raw[needed].dim() != dims:
            raise ValueError(f"{path}: {needed} must be {dims}-D, got shape {list(raw[needed].shape)}")
    layers = 1 + max((b for k in raw if (b := _block_of(k)) is not None), default=-1)
    vocab, hidden = raw["emb.weight"].shape
    heads, head_size = raw["blocks.0.att.r_k"].shape
    if heads * head_size != hidden:
        raise ValueError(f"{path}: blocks.0.att.r_k has shape {list(raw['blocks.0.att.r_k'].shape)} "
                         f"(heads x head size = {heads * head_size}), but emb.weight's width is {hidden}")
    v_key = "blocks.1.att.v1" if layers > 1 else "blocks.0.att.v1"
    shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_size=head_size,
                 intermediate_size=raw["blocks.0.ffn.key.weight"].shape[0],
                 decay_low_rank_dim=raw["blocks.0.att.w1"].shape[1], a_low_rank_dim=raw["blocks.0.att.a1"].shape[1],
                 gate_low_rank_dim=raw["blocks.0.att.g1"].shape[1])
    if v_key in raw and raw[v_key].dim() == 2:
        shape["v_low_rank_dim"] = raw[v_key].shape[1]
    clash = [f"{k}={config_overrides[k]!r} was given, but the tensors say {shape[k]}" for k in shape
             if k in config_overrides and config_overrides[k] != shape[k]]
    if clash:
        raise ValueError(f"{path}: {'; '.join(clash)} (shapes are read from the checkpoint)")
    for k in shape:
        config_overrides.pop(k, None)
    try:
        config = RWKV7Config(**shape, **config_overrides)
    except TypeError as e:
        raise TypeError(f"from_blinkdl({path}): bad config override: {e}") from None
    except ValueError as e:
        hint = (f" (head size {head_size} read from blocks.0.att.r_k of shape "
                f"{list(raw['blocks.0.att.r_k'].shape)})" if "head_size" in str(e) else "")
        raise ValueError(f"{path}: {e}{hint}") from e
    # Layer 0's v LoRA exists in BlinkDL's training code but is never used.
    state = {blinkdl_to_ours(k): v for k, v in raw.items()
             if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
    return _assign(cls, config, state, dtype, device, str(path), config_source="shapes read from its tensors",
                   spell=ours_to_blinkdl)


# ---------------------------------------------------------------------- fla

_FLA_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_FLA_LORA = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}


def fla_name(key: str) -> tuple[str, str | None]:
    """Our key -> ``(fla key, transform)``, transform ``'t'`` (transposed), ``'row'``
    (``[H]`` here, ``[1, 1, H]`` there) or None."""
    top = {"embeddings.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    if key in top:
        return top[key], None
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if m is None:
        return key, None
    i, rest = m.groups()
    prefix = f"model.layers.{i}."
    norms = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
    part, _, leaf = rest.partition(".")
    if part == "*":  # a whole block, in messages
        return prefix + "*", None
    if part in norms:
        return prefix + norms[part] + "." + leaf, None
    if part == "feed_forward":
        return prefix + "ffn." + leaf, None
    if part != "attention":
        return key, None
    name, _, tail = leaf.partition(".")
    if name in _FLA_PROJ:
        return f"{prefix}attn.{_FLA_PROJ[name]}.{tail}", None
    if name == "ln_x":
        return f"{prefix}attn.g_norm.{tail}", None
    if re.fullmatch(r"[wavg][012]", name):
        return f"{prefix}attn.{name[0]}_lora.{_FLA_LORA[name[1]]}", ("t" if name[1] != "0" else None)
    if name.startswith("x_"):
        return f"{prefix}attn.{name}", "row"
    return f"{prefix}attn.{leaf}", None


def save_fla(model, path: str | Path) -> None:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "head.weight" and model.config.tie_word_embeddings:
            continue  # safetensors refuses shared storage; the loader re-ties
        name, transform = fla_name(key)
        t = t.detach().cpu()
        if transform == "t":
            t = t.t()
        elif transform == "row":
            t = t.reshape(1, 1, -1)
        tensors[name] = t.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_dict(dtype=model.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_fla(cls, path: str | Path, *, dtype, device):
    device = _check_load_args("from_pretrained", dtype, device)
    directory = Path(path)
    if directory.is_file():
        raise NotADirectoryError(f"{directory}: from_pretrained expects an fla RWKV-7 checkpoint directory "
                                 "(config.json and weights), got a file; a BlinkDL .pth loads with "
                                 "RWKV7LM.from_blinkdl")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected an fla RWKV-7 checkpoint directory)")
    raw_config = _read_json(config_file)
    if isinstance(raw_config, dict) and "model_type" not in raw_config:
        raise ValueError(f"{config_file}: no model_type (expected 'rwkv7', fla's RWKV7ForCausalLM)")
    try:
        config = RWKV7Config.from_dict(raw_config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from e
    raw, _origin, source = _read_hf_weights(directory)
    with torch.device("meta"):
        expected = cls(config, init=False).state_dict()
    inverse = {fla_name(k)[0]: (k, fla_name(k)[1]) for k in expected}
    state, unexpected = {}, []
    for name, t in raw.items():
        if name not in inverse:
            unexpected.append(name)
            continue
        ours, transform = inverse[name]
        if transform == "t" and t.dim() == 2:
            # Contiguous: a transposed view would give GEMMs of another memory
            # layout, hence other rounding, than the same model loaded from a .pth.
            t = t.t().contiguous()
        state[ours] = t
    return _assign(cls, config, state, dtype, device, source, config_source=str(config_file),
                   spell=lambda k: fla_name(k)[0], unexpected_extra=unexpected)
