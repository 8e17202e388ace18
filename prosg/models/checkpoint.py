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

from prosg.models.checks import MODEL_DTYPES, check_model_dtype
from prosg.models.config import RWKV4Config

_HF_PREFIX = "rwkv."
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size", "intermediate_size")


def _names(keys, limit: int = 8) -> str:
    """A short, naturally sorted list of names for a message (a checkpoint that is
    not an RWKV-4 model at all would otherwise produce thousands)."""
    def natural(k: str):
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", k)]

    keys = sorted(keys, key=natural)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... {len(keys) - limit} more' if len(keys) > limit else ''}]"


def _ranges(numbers: list[int]) -> str:
    """``[0, 3-31]`` for ``[0, 3, 4, ..., 31]``: a config that defaults to 32 layers
    against a 3-layer file would otherwise list 29 block numbers."""
    parts, i = [], 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        parts += [f"{numbers[i]}-{numbers[j]}"] if j - i >= 2 else [str(n) for n in numbers[i:j + 1]]
        i = j + 1
    return f"[{', '.join(parts)}]"


def _describe(obj) -> str:
    if isinstance(obj, dict):
        odd = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        kinds = sorted({type(obj[k]).__name__ for k in odd})
        return (f"a dict of {len(obj)} entries, {len(odd)} of them not str -> Tensor "
                f"(e.g. {_names(map(str, odd), 4)} holding {', '.join(kinds)})")
    return f"a {type(obj).__name__}"


def _read_file(path: Path) -> dict[str, Tensor]:
    """One weight file (safetensors, or a ``torch.save`` file) as ``{name: tensor}``.
    Every failure names the file: safetensors' and torch's own errors do not."""
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory, expected a weight file")
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError derives from Exception only
            raise ValueError(f"{path}: cannot read it as safetensors ({size} bytes; truncated, empty or not a "
                             f"safetensors file?): {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            # The first line is the useful part: torch appends a page of advice on
            # weights_only to unpickling errors.
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"{path}: cannot read it as a torch.save state dict ({size} bytes; truncated, empty, "
                             f"not a PyTorch file, or pickled objects other than tensors?): "
                             f"{type(e).__name__}: {first}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a state dict {{name: tensor}}, got {_describe(state)}")
    return state


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _read_hf_weights(directory: Path) -> tuple[dict[str, Tensor], dict[str, Path], str]:
    """``(tensors, the file each came from, a description of the files)``."""
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            state = _read_file(path)
            return state, dict.fromkeys(state, path), str(path)
        index = _read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{path}: expected a sharded-checkpoint index {{\"weight_map\": {{name: shard file}}}}, "
                             f"got {_describe(index) if not isinstance(index, dict) else 'keys ' + _names(index)}")
        state: dict[str, Tensor] = {}
        origin: dict[str, Path] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{path}: lists the shard {shard!r}, but {shard_path} does not exist")
            tensors = _read_file(shard_path)
            twice = sorted(set(tensors) & set(state))
            if twice:
                raise ValueError(f"{shard_path}: holds {_names(twice)}, already read from {origin[twice[0]]}")
            state.update(tensors)
            origin.update(dict.fromkeys(tensors, shard_path))
        # A shard that lost tensors (a truncated download re-saved, a stale copy) would
        # otherwise show up as "missing" keys with no hint of which file is at fault.
        lost = [k for k, shard in weight_map.items() if origin.get(k) != directory / shard]
        if lost:
            raise ValueError(f"{path}: the weight_map puts {_names(lost)} in "
                             f"{_names(sorted({weight_map[k] for k in lost}), 3)}, but those files do not hold them")
        return state, origin, f"{path} (shards {_names(sorted(set(weight_map.values())), 3)})"
    raise FileNotFoundError(f"{directory}: no weights found; looked for {', '.join(_WEIGHT_FILES)}")


def _shape_desc(config: RWKV4Config) -> str:
    return ", ".join(f"{f}={getattr(config, f)}" for f in _SHAPE_FIELDS + ("tie_word_embeddings",))


def _load_into(cls, config: RWKV4Config, state: dict[str, Tensor], dtype: torch.dtype | None,
               device: torch.device | str, source: str, *, config_source: str,
               origin: dict[str, Path] | None = None):
    """Builds the model on the meta device (no initialisation cost) and assigns the
    tensors of ``state`` (keys without the ``rwkv.`` prefix) after checking that every
    expected key is there, with its shape and a floating dtype, and nothing else is.
    Every problem is reported at once, naming ``source`` (the file(s)) and
    ``config_source`` (where the expected shapes came from)."""
    with torch.device("meta"):
        model = cls(config, init=False)
    expected = model.state_dict()
    if config.tie_word_embeddings and "embeddings.weight" in state:
        state.setdefault("head.weight", state["embeddings.weight"])
    L = config.num_hidden_layers
    in_file = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    absent = sorted(set(range(L)) - in_file)
    beyond = sorted(in_file - set(range(L)))

    def block_of(key: str) -> int | None:
        m = _BLOCK.match(key)
        return int(m.group(1)) if m else None

    # Whole blocks are named once (``blocks.5.*``) instead of key by key.
    missing = [k for k in expected if k not in state and block_of(k) not in absent]
    missing += [f"blocks.{i}.*" for i in absent]
    unexpected = [k for k in state if k not in expected and block_of(k) not in beyond]
    unexpected += [f"blocks.{i}.*" for i in beyond]
    misshaped, not_float = [], []
    for key, param in expected.items():
        t = state.get(key)
        if t is None:
            continue
        where = f" in {origin[key].name}" if origin and len(set(origin.values())) > 1 and key in origin else ""
        if t.shape != param.shape:
            # BlinkDL and some converters store the time_* vectors squeezed.
            if key.rsplit(".", 1)[-1].startswith("time_") and t.numel() == param.numel():
                state[key] = t = t.reshape(param.shape)
            else:
                misshaped.append(f"{key}{where}: {list(t.shape)} (expected {list(param.shape)})")
        if not t.is_floating_point():
            not_float.append(f"{key}{where}: {t.dtype}")
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
        raise ValueError(f"{source}: the weights do not match an RWKV-4 model of {L} layers ({config_source}; "
                         f"{_shape_desc(config)}): {'; '.join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.head.weight = model.embeddings.weight
    if dtype is None:
        dtype = model.embeddings.weight.dtype
        if dtype not in MODEL_DTYPES:
            raise ValueError(f"{source}: the weights are stored in {dtype}, which the model cannot run in; "
                             f"pass dtype= one of {_dtype_names()}")
    # One activation dtype for the whole model (mixed files exist: float16 matrices
    # with float32 LayerNorms); time_decay / time_first stay float32 for 16-bit.
    model.to_dtype(dtype)
    return model.to(device).eval()


def _dtype_names() -> str:
    return ", ".join(str(d) for d in MODEL_DTYPES)


def _check_load_args(where: str, dtype, device) -> torch.device:
    """Checks ``dtype`` and ``device`` before any file is read (a wrong argument should
    not cost a multi-gigabyte load, nor surface as torch's 'Invalid device string')."""
    if dtype is not None:
        check_model_dtype(dtype, f"{where}: dtype")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{where}: device must be a torch.device, a str such as 'cpu' or 'cuda:0', or a CUDA index, "
                        f"got {device!r} ({type(device).__name__})")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: device {device!r} is not a device ({e})") from e


def load_hf(cls, path: str | Path, *, dtype: torch.dtype | None, device: torch.device | str):
    device = _check_load_args("from_pretrained", dtype, device)
    directory = Path(path)
    if directory.is_file():
        raise NotADirectoryError(f"{directory}: from_pretrained expects a transformers checkpoint directory "
                                 "(config.json and weights), got a file; a BlinkDL .pth loads with "
                                 "RWKV4LM.from_blinkdl")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: no config.json (expected a transformers RWKV-4 checkpoint directory)")
    raw_config = _read_json(config_file)
    try:
        config = RWKV4Config.from_dict(raw_config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from e
    defaulted = [f for f in _SHAPE_FIELDS if f not in raw_config]
    config_source = f"{config_file}" + (f", which does not set {defaulted} (defaults used)" if defaulted else "")
    raw, origin, source = _read_hf_weights(directory)
    state = {k.removeprefix(_HF_PREFIX): v for k, v in raw.items()}
    origin = {k.removeprefix(_HF_PREFIX): v for k, v in origin.items()}
    return _load_into(cls, config, state, dtype, device, source, config_source=config_source, origin=origin)


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
    device = _check_load_args("from_blinkdl", dtype, device)
    path = Path(path)
    raw = _read_file(path)
    state = {blinkdl_to_hf_name(k): v for k, v in raw.items()}
    for needed in ("embeddings.weight", "blocks.0.attention.key.weight", "blocks.0.feed_forward.key.weight"):
        if needed not in state:
            raise ValueError(f"{path}: not an RWKV-4 checkpoint (no {needed!r} after renaming BlinkDL keys)")
        if state[needed].dim() != 2:
            raise ValueError(f"{path}: {needed} must be a matrix, got shape {list(state[needed].shape)}")
    # The file has no config: its depth is the blocks it holds. A file that lost its
    # last block looks exactly like a shallower model, so a depth the caller knows
    # (num_hidden_layers=...) is checked against the file rather than refused.
    layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    vocab, hidden = state["embeddings.weight"].shape
    shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                 attention_hidden_size=state["blocks.0.attention.key.weight"].shape[0],
                 intermediate_size=state["blocks.0.feed_forward.key.weight"].shape[0])
    given = {k: config_overrides.pop(k) for k in _SHAPE_FIELDS if k in config_overrides}
    try:
        config = RWKV4Config(**{**shape, **given}, **config_overrides)
    except TypeError as e:
        raise TypeError(f"from_blinkdl({path}): bad config override: {e}") from None
    except ValueError as e:
        raise ValueError(f"from_blinkdl({path}): {e}") from e
    clash = [f"{k}={v!r} was given, but the tensors say {shape[k]}" for k, v in given.items()
             if k != "num_hidden_layers" and v != shape[k]]
    if clash:
        raise ValueError(f"{path}: {'; '.join(clash)} (shapes are read from the checkpoint; a value given is "
                         "only checked against it)")
    config_source = ("num_hidden_layers as given, the other shapes read from its tensors"
                     if "num_hidden_layers" in given else "shapes read from its tensors")
    return _load_into(cls, config, state, dtype, device, str(path), config_source=config_source)
