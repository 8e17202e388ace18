"""Self-describing generator directories (``save_pretrained`` / ``from_pretrained``).

A generator directory holds

* ``generator.safetensors``: the weights, in the checkpoint format of
  :mod:`prosg.method.train` (``generator.*`` tensors; metadata with the generator
  config, the base model's identity and a sha256 of it all), so the loaders of earlier
  releases, ``load_generator`` and ``prosg eval --generator FILE``, still read it;
* ``generator_config.json``: what a user or tool reads without torch: the generator
  settings, the resolved target matrices, the base model's identity (architecture,
  config, sha256 of its weights), where the base was loaded from (a hint for
  ``prosg generate``), the tokenizer spec (:mod:`prosg.data.text`) and, for a trained
  generator, the training config;
* the tokenizer's file when it has one (``tokenizer.json``).

``prosg train --out DIR`` writes this layout (DIR also holds the resumable
``checkpoint.safetensors`` and the log). :func:`load_pretrained` also reads a bare
``generator.safetensors`` / ``checkpoint.safetensors`` or a run folder of an older
prosg without ``generator_config.json``: the weights carry the generator config and
the base identity, only the tokenizer is then unknown (None).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prosg.method.outputs import atomic_write_text

log = logging.getLogger("prosg.pretrained")

CONFIG_FILE = "generator_config.json"
WEIGHTS_FILE = "generator.safetensors"
DIR_FORMAT = "prosg.generator_dir/1"


def write_config(directory: Path, generator, base: dict, *, tokenizer=None, base_path: str | None = None,
                 train_config: dict | None = None) -> dict:
    """Writes ``generator_config.json`` (atomically) and the tokenizer's files."""
    directory = Path(directory)
    config = {"format": DIR_FORMAT, "weights": WEIGHTS_FILE, "generator": generator.config.to_dict(),
              "targets": list(generator.targets), "base_model": base, "base_path": base_path,
              "tokenizer": tokenizer.spec() if tokenizer is not None else None, "train_config": train_config}
    if tokenizer is not None:
        tokenizer.save(directory)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def save_pretrained(generator, directory, model=None, *, tokenizer=None, base_path: str | None = None) -> None:
    """See :meth:`SyntheticGradientGenerator.save_pretrained`."""
    from prosg.method.train import base_identity, save_checkpoint

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
    base = base_identity(model) if model is not None else getattr(generator, "base_identity", None)
    if base is None:
        raise ValueError("save_pretrained: pass the base model (save_pretrained(dir, model)): the directory records "
                         "its identity so that loading onto another base is refused")
    tokenizer = tokenizer if tokenizer is not None else getattr(generator, "tokenizer", None)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / WEIGHTS_FILE, generator, None, 0, None, base)
    write_config(directory, generator, base, tokenizer=tokenizer, base_path=base_path)


def read_config(path: str | Path) -> dict | None:
    """The ``generator_config.json`` of a directory (None when it has none)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or config.get("format") != DIR_FORMAT:
        raise ValueError(f"{file}: not a prosg generator config (format {config.get('format') if isinstance(config, dict) else None!r}, "
                         f"expected {DIR_FORMAT!r})")
    return config


def weights_path(path: str | Path) -> Path:
    """The weights file of a generator directory or file."""
    path = Path(path)
    if path.is_dir():
        config = read_config(path)
        weights = path / (config["weights"] if config else WEIGHTS_FILE)
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {weights.name} (not a generator directory written by "
                                    "save_pretrained or prosg train)")
        return weights
    if not path.is_file():
        raise FileNotFoundError(f"--generator {path}: no such file or directory")
    return path


def load_pretrained(path, model):
    """``(generator, config)``: the generator at ``path`` (a directory or a weights
    file) for ``model``, in eval mode, with ``generator.base_identity`` and
    ``generator.tokenizer`` (None when not recorded) set; ``config`` is the directory's
    ``generator_config.json`` (None for a bare weights file). A different base model is
    refused with a ValueError naming what differs."""
    from prosg.data.text import tokenizer_from_spec
    from prosg.method.generator import GeneratorConfig
    from prosg.method.train import base_identity, check_base, generator_from_checkpoint, read_checkpoint

    path = Path(path)
    config = read_config(path) if path.is_dir() else None
    weights = weights_path(path)
    identity = base_identity(model)
    if config is not None:
        # the JSON is what a user reads: check against it (and the weights' own record below)
        check_base({"base_model": json.dumps(config["base_model"])}, model, path / CONFIG_FILE, identity)
    tensors, meta = read_checkpoint(weights)
    check_base(meta, model, weights, identity)
    if config is not None:
        recorded = GeneratorConfig.from_dict(config["generator"]).to_dict()
        if json.loads(meta["generator_config"]) != recorded:
            raise ValueError(f"{path / CONFIG_FILE} and {weights} disagree on the generator settings: the directory "
                             "mixes two generators' files")
    generator = generator_from_checkpoint(tensors, meta, model, weights)
    if config is not None and list(generator.targets) != list(config["targets"]):
        raise ValueError(f"{path / CONFIG_FILE} lists targets {config['targets'][:4]}..., the generator resolves "
                         f"{generator.targets[:4]}... on this model")
    generator.base_identity = json.loads(meta["base_model"]) if "base_model" in meta else identity
    generator.tokenizer = None
    spec = config.get("tokenizer") if config is not None else None
    if spec is not None:
        generator.tokenizer = tokenizer_from_spec(spec, path)
    elif config is None:
        log.warning("%s has no %s (a bare weights file or an older prosg run): the tokenizer it was trained with "
                    "is not recorded", path, CONFIG_FILE)
    return generator, config
