"""Loading a base model by its ``config.json``, for any architecture that implements
:class:`prosg.models.protocol.RecurrentLM`.

``config.json``'s ``model_type`` picks the class from :data:`ARCHITECTURES` (``"rwkv"``:
transformers' RWKV-4 layout, :class:`prosg.models.RWKV4LM`; ``"rwkv7"``: fla's RWKV-7
layout, :class:`prosg.models.RWKV7LM`); another architecture
registers itself with :func:`register_architecture` (a class with
``from_pretrained(path, dtype=, device=)``), and the pipeline, ``prosg generate`` and
training then load it without naming it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

#: model_type -> "module:Class" (imported when first used).
ARCHITECTURES: dict[str, str] = {
    "rwkv": "prosg.models.rwkv4:RWKV4LM",
    # flash-linear-attention's RWKV7ForCausalLM layout (docs/rwkv7.md)
    "rwkv7": "prosg.models.rwkv7:RWKV7LM",
    "rwkv7_fla": "prosg.models.rwkv7:RWKV7LM",
}


def register_architecture(model_type: str, target: str | type) -> None:
    """Maps ``config.json``'s ``model_type`` to a class (or ``"module:Class"``)."""
    ARCHITECTURES[model_type] = target


def _resolve(target):
    if isinstance(target, str):
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)
    return target


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """The model saved in directory ``path`` (``config.json`` + weights), in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--base {path}: no such model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--base {path}: no config.json (not a model directory)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "rwkv")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file}: not a JSON object ({e})") from None
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{config_file}: model_type {model_type!r} has no prosg model; known: "
                         f"{', '.join(sorted(ARCHITECTURES))} (prosg.models.loading.register_architecture adds one)")
    return _resolve(ARCHITECTURES[model_type]).from_pretrained(path, dtype=dtype, device=device).eval()
