"""Training the synthetic-gradient generator on a frozen base model (``prosg train``).

Objective (teacher forcing, docs/method.md): for a batch of (prompt, response) pairs,
``delta = generator(model, prompt)``; the frozen model reads the prompt but its last
token without the delta, then ``prompt[-1] + response`` *with* it (the delta applies
at every position that predicts a response token: the convention of
:func:`prosg.method.evaluation.evaluate`, so training and evaluation run the same
function), and the loss is the mean next-token cross-entropy over the response tokens. Only the
generator's parameters receive gradients; they flow through the fused low-rank kernels.

Data: the multi-stage benchmark (docs/benchmark.md). Example ``i`` of a seed is a pure
function of ``(seed, i)``, so step ``s`` on rank ``k`` of ``W`` ranks trains on
examples ``(s * W + k) * batch_size ...`` and a resumed run needs no data-loader state.

Checkpoints (``checkpoint.safetensors``, written atomically every ``save_every`` steps
and at the end): the generator's weights, AdamW's state, the step and the RNG states,
with the configs, the base model's identity (:func:`base_identity`) and a sha256 of it
all in the safetensors metadata; reading one verifies the checksum and that every
tensor is finite. ``resume=True`` continues from it and gives the same weights as an
uninterrupted run (tests/test_train.py checks it); the log is cut back to its step.

Safety (tests/test_cli_adversarial.py): a non-finite loss, gradient or weight stops
the run (:class:`TrainingDiverged`) before anything of that step is written; a folder
holding a run is not reused without ``resume`` or ``overwrite``, and one process at a
time holds it (:func:`prosg.method.outputs.locked`).

Multi-GPU: run under ``torchrun``; then (any ``WORLD_SIZE``) the generator is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU) and each rank takes its slice of the
global batch. The loss is averaged per rank, then DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.data import IGNORE_INDEX, Batch, MultiStageConfig, TokenizedPair, collate, encode_example, generate_example
from prosg.data.vocab import benchmark_tokenizer
from prosg.method.generator import GeneratorConfig, SyntheticGradientGenerator
from prosg.method.outputs import atomic_write, atomic_write_text, locked, refuse_existing
from prosg.models import Delta
from prosg.models.generation import prefill
from prosg.models.protocol import RecurrentLM, RecurrentState

log = logging.getLogger("prosg.train")

CHECKPOINT = "checkpoint.safetensors"
GENERATOR = "generator.safetensors"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
#: What a run writes to its folder: their presence means the folder holds a run.
RUN_FILES = (CHECKPOINT, GENERATOR, LOG_FILE, CONFIG_FILE, "generator_config.json")
FORMAT = "prosg.generator/1"


class TrainingDiverged(FloatingPointError):
    """A non-finite loss, gradient or weight: the run stops before that step is saved."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in every checkpoint; a resumed
    run must match it)."""

    # Each field's metadata is its `prosg train` flag's help; "min" bounds a number
    # (from below; "above": strictly).
    steps: int = field(default=300, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int = field(default=16, metadata={"help": "examples per step, per process", "min": 1})
    lr: float = field(default=1e-2, metadata={"help": "peak learning rate (AdamW)", "min": 0, "above": True})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "min": 0})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps", "min": 0})
    min_lr_ratio: float = field(default=0.1, metadata={
        "help": "the cosine schedule's final learning rate, as a fraction of the peak", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)", "min": 0})
    span_start_weight: float = field(default=1.0, metadata={
        "help": "weight of the loss on the first --span-start-tokens tokens of each instruction's response span, "
                "relative to the other response tokens (benchmark data: the tokens that decide which instruction "
                "is carried out; 1: the plain mean)", "min": 0, "above": True})
    span_start_tokens: int = field(default=3, metadata={
        "help": "how many of a span's first tokens --span-start-weight weighs", "min": 1})
    own_context: float = field(default=0.0, metadata={
        "help": "the fraction of each batch's rows (the last ones) that read the response the model writes itself "
                "(greedy, under the step's delta, no gradient) instead of the reference, the labels staying the "
                "reference's; the other rows stay teacher-forced (benchmark data: fixed span lengths keep the "
                "positions aligned; 0: off)", "min": 0})
    filler_loss: bool = field(default=True, metadata={
        "help": "take the loss on ramble filler words too (without it the delta is free to disturb the "
                "ramble, see docs/results.md)"})
    seed: int = field(default=0, metadata={"help": "generator initialisation"})
    data_seed: int = field(default=0, metadata={"help": "benchmark seed of the training examples (--data: the "
                                                        "seed of each epoch's shuffle)"})
    data: dict = field(default_factory=dict)  # MultiStageConfig fields
    generator: dict = field(default_factory=dict)  # GeneratorConfig fields
    # User data (--data): a JSONL of {"prompt", "response"} lines instead of the benchmark.
    data_file: str = ""
    data_sha256: str = ""  # the file's, so that --resume refuses a changed file
    tokenizer: str = ""  # a name or file (prosg.data.text.load_text_tokenizer)
    tokenizer_spec: dict = field(default_factory=dict)  # its spec (with the sha256 of its files)
    max_length: int = field(default=0, metadata={
        "help": "most prompt + response tokens of a --data example (0: no limit); longer is an error, or see "
                "--truncate", "min": 0})
    truncate: str = field(default="error", metadata={
        "help": "an example over --max-length: refuse it, naming the line (error), or cut the response's end "
                "(response); prompts are never cut", "choices": ("error", "response")})
    chunk_length: int = field(default=0, metadata={
        "help": "run the response in chunks of this many tokens, the state carried with its gradient (bounds "
                "the logits' memory on long responses; 0: one piece)", "min": 0})
    precision: str = field(default="float32", metadata={
        "help": "the frozen base model's dtype: float32, or bfloat16 (the generator stays float32 under "
                "bfloat16 autocast; its delta is cast to the model's dtype)", "choices": ("float32", "bfloat16")})
    checkpointing: bool = field(default=False, metadata={
        "help": "activation checkpointing of the base model per chunk (recomputed in the backward pass: less "
                "memory, about one more forward)"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "span_start_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"TrainConfig.{name} must be an int >= {0 if name == 'warmup_steps' else 1}, got {v!r}")
        for name in ("max_length", "chunk_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if self.truncate not in ("error", "response"):
            raise ValueError(f"TrainConfig.truncate must be 'error' or 'response', got {self.truncate!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.precision must be 'float32' or 'bfloat16', got {self.precision!r}")
        if self.data_file and not self.tokenizer:
            raise ValueError("TrainConfig.data_file needs a tokenizer (--tokenizer FILE|NAME)")
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "span_start_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite float >= 0, got {v!r}")
        if self.span_start_weight == 0:
            raise ValueError("TrainConfig.span_start_weight must be > 0 (1: the plain mean), got 0")
        if not isinstance(self.own_context, (int, float)) or not 0 <= self.own_context <= 1:
            raise ValueError(f"TrainConfig.own_context must be a fraction in [0, 1], got {self.own_context!r}")
        if self.data_file and self.own_context:
            raise ValueError("TrainConfig.own_context needs the benchmark's fixed-length spans; user data (--data) "
                             "has none")
        if self.data_file and self.span_start_weight != 1:
            raise ValueError("TrainConfig.span_start_weight needs the benchmark's stage spans; user data (--data) "
                             f"has none, got {self.span_start_weight!r}")

    def data_config(self) -> MultiStageConfig:
        return MultiStageConfig.from_dict(self.data)

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig.from_dict(self.generator) if self.generator else GeneratorConfig()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at the last step; a pure function of the step, so resuming needs no scheduler state."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- data


def make_batch(data: MultiStageConfig, seed: int, indices: range | list[int], *, filler_loss: bool = True,
               span_start_weight: float = 1.0, span_start_tokens: int = 3) -> Batch:
    """Benchmark examples ``indices`` of ``seed``, right-padded (prompt then response in
    each row, pads after: the model runs padded rows as they are).

    ``filler_loss=False``: no loss on the filler words of ``ramble`` stages (their
    ``labels`` become ``IGNORE_INDEX``; the separator that ends the stage keeps its
    label). They are uniform random draws, so no delta can lower their expected loss
    below the base model's. Training without them is worse, though (docs/results.md):
    nothing then stops the delta from pushing prompt tokens into the ramble, whose
    accuracy fell from 79 % to 43 % and took the later stages down with it."""
    tok = benchmark_tokenizer()
    examples = [generate_example(data, seed, i) for i in indices]
    batch = collate([encode_example(e, tok) for e in examples], tok.pad_id, prompt_padding="right")
    if not filler_loss:
        for b, example in enumerate(examples):
            for k, stage in enumerate(example.stages):
                if stage.op == "ramble":
                    # the stage's columns: [its tag (tagged, first stage)], its words, the separator
                    cols = (batch.stage_ids[b] == k).nonzero().flatten()
                    batch.labels[b, cols[-1 - stage.length : -1]] = IGNORE_INDEX
    if span_start_weight != 1.0:
        batch.label_weights = torch.ones(batch.labels.shape)
        for b, example in enumerate(examples):
            for k, stage in enumerate(example.stages):
                if stage.op != "ramble":
                    # a span's first tokens (after the tag of a tagged first stage)
                    cols = (batch.stage_ids[b] == k).nonzero().flatten()
                    cols = cols[len(cols) - 1 - stage.length:][:span_start_tokens]
                    batch.label_weights[b, cols] = span_start_weight
    return batch


def batch_indices(config: TrainConfig, step: int, rank: int, world: int) -> range:
    start = (step * world + rank) * config.batch_size
    return range(start, start + config.batch_size)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def user_batch(pairs: list[TokenizedPair], config: TrainConfig, step: int, rank: int, world: int) -> Batch:
    """The examples of ``step`` on ``rank`` from user pairs: global example ``i`` is
    ``pairs[order_e[i % n]]`` with ``order_e`` a seeded shuffle of epoch ``e = i // n``,
    a pure function of the step (resuming needs no loader state), right-padded."""
    n = len(pairs)
    rows = [pairs[_epoch_order(n, config.data_seed, i // n)[i % n]] for i in batch_indices(config, step, rank, world)]
    return collate(rows, 0, prompt_padding="right")


def load_user_data(config: TrainConfig, tokenizer=None) -> tuple[list[TokenizedPair], object]:
    """The pairs and tokenizer of ``config.data_file`` (JSONLError on a bad line, before
    anything is written). A tokenizer whose files changed since the config was made is
    refused."""
    from prosg.data.text import load_text_pairs, load_text_tokenizer

    tok = tokenizer if tokenizer is not None else load_text_tokenizer(config.tokenizer)
    if config.tokenizer_spec and tok.spec() != config.tokenizer_spec:
        raise ValueError(f"--tokenizer {config.tokenizer}: its files differ from the ones this run was started with")
    pairs = load_text_pairs(config.data_file, tok, max_length=config.max_length, truncate=config.truncate)
    return pairs, tok


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- loss


def prefix_state(model: RecurrentLM, prompt_ids: Tensor, prompt_lengths: Tensor) -> RecurrentState | None:
    """The base model's state after all but the last token of each (right-padded)
    prompt, without delta (:func:`prosg.models.generation.prefill`). None when every
    prompt is one token (the empty state)."""
    return prefill(model, prompt_ids, prompt_lengths - 1)


def _response_columns(batch: Batch) -> Tensor:
    """``[B, R]``: the column of ``batch.labels`` of each response token (clamped past a
    row's end)."""
    R = batch.response_ids.shape[1]
    return (batch.response_start.unsqueeze(1) + torch.arange(R, device=batch.labels.device)).clamp(
        max=batch.labels.shape[1] - 1)


def continuation(batch: Batch) -> tuple[Tensor, Tensor]:
    """``[B, 1 + R]`` ids ``prompt[-1] ‖ response`` (right-padded) and their labels
    (the response tokens, IGNORE_INDEX at pads), from a right-padded batch."""
    if batch.prompt_padding != "right":
        raise ValueError("the training batch must be right-padded (Collator(..., prompt_padding='right'))")
    last = batch.prompt_ids.gather(1, (batch.prompt_lengths - 1).clamp(min=0).unsqueeze(1))
    ids = torch.cat([last, batch.response_ids], 1)
    # The response's labels as batch.labels has them (so positions masked there, e.g.
    # filler words, stay without loss), re-laid out like response_ids.
    response_labels = batch.labels.gather(1, _response_columns(batch)).masked_fill(~batch.response_mask, IGNORE_INDEX)
    labels = torch.cat([torch.full_like(last, IGNORE_INDEX), response_labels], 1)
    return ids, labels


def response_loss(model: RecurrentLM, batch: Batch, delta=None, state: RecurrentState | None = None, *,
                  chunk_length: int = 0, checkpointing: bool = False, reduction: str = "mean") -> Tensor:
    """Mean next-token cross-entropy over the response tokens of a right-padded batch,
    with ``delta`` applied from each prompt's last token on (the convention of
    :func:`prosg.method.evaluation.evaluate`): the prompt but its last token is read by
    the base model (``state``: :func:`prefix_state`, computed when not given), then
    ``prompt[-1] ‖ response`` runs under the delta.

    ``chunk_length > 0`` runs ``prompt[-1] ‖ response`` in pieces of that many tokens,
    each continuing from the previous one's state *with its gradient* (the kernels
    differentiate through the state), so the loss and its gradient are those of one
    piece; only one chunk's logits exist at a time. ``checkpointing`` recomputes each
    chunk in the backward pass instead of keeping its activations
    (``torch.utils.checkpoint``, non-reentrant: the state is any object).
    ``reduction="none"``: the per-position losses ``[B, R]`` (0 where no label)."""
    if state is None:
        state = prefix_state(model, batch.prompt_ids, batch.prompt_lengths)
    ids, labels = continuation(batch)
    targets = labels[:, 1:]
    # the last position predicts nothing: the model reads ids[:, :-1] only
    inputs = ids[:, :-1]
    T = inputs.shape[1]
    chunk = chunk_length if chunk_length > 0 else T

    def piece(state, delta, start: int):
        logits, state = model(inputs[:, start:start + chunk], state=state, delta=delta)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, start:start + chunk].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view(logits.shape[0], -1), state

    parts = []
    for start in range(0, T, chunk):
        if checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            losses, state = checkpoint(piece, state, delta, start, use_reentrant=False)
        else:
            losses, state = piece(state, delta, start)
        parts.append(losses)
    losses = torch.cat(parts, 1)
    if reduction == "none":
        return losses
    if batch.label_weights is not None:
        weights = batch.label_weights.gather(1, _response_columns(batch)) * (targets != IGNORE_INDEX)
        return (losses * weights).sum() / weights.sum()
    # as F.cross_entropy's mean: NaN when nothing has a label
    return losses.sum() / (targets != IGNORE_INDEX).sum()


class _Objective(nn.Module):
    """The generator plus the loss, as one module for DDP. The frozen base model is
    held outside the module tree (DDP must neither broadcast nor reduce it)."""

    def __init__(self, generator: SyntheticGradientGenerator, model: RecurrentLM, config: "TrainConfig | None" = None):
        super().__init__()
        self.generator = generator
        self._model = [model]
        self._config = config if config is not None else TrainConfig()

    def forward(self, batch: Batch, state: RecurrentState | None) -> Tensor:
        model, config = self._model[0], self._config
        if config.precision == "bfloat16":
            # autocast for the generator's own layers only: prosg's kernels take one
            # dtype, so the delta is cast to the (bfloat16) base model's.
            with torch.autocast(model.device.type, dtype=torch.bfloat16):
                delta = self.generator(model, batch.prompt_ids, batch.prompt_mask)
            delta = delta.to(model.dtype)
        else:
            delta = self.generator(model, batch.prompt_ids, batch.prompt_mask)
        own = round(config.own_context * len(batch))
        if own:
            batch = with_own_responses(model, batch, delta.detach(), range(len(batch) - own, len(batch)))
        return response_loss(model, batch, delta, state, chunk_length=config.chunk_length,
                             checkpointing=config.checkpointing)


@torch.no_grad()
def with_own_responses(model: RecurrentLM, batch: Batch, delta, rows: range | list[int]) -> Batch:
    """``batch`` with the responses of ``rows`` replaced, as the model's *input*, by the
    greedy responses the model writes under ``delta`` (as long as the reference; past an
    early ``<eos>`` the reference's tokens): the labels stay the reference's."""
    from prosg.method.evaluation import generate_responses

    rows = list(rows)
    lengths = [int(batch.response_lengths[b]) for b in rows]
    prompts = [batch.prompt_ids[b, :int(batch.prompt_lengths[b])].tolist() for b in rows]
    picked = torch.tensor(rows, dtype=torch.long, device=batch.prompt_ids.device)
    sub = Delta({k: (u.index_select(0, picked), v.index_select(0, picked)) for k, (u, v) in delta.factors.items()},
                delta.scale)
    ids = batch.response_ids.clone()
    for b, tokens in zip(rows, generate_responses(model, prompts, lengths, delta=sub)):
        ids[b, :len(tokens)] = torch.tensor(tokens, dtype=ids.dtype, device=ids.device)
    return dataclasses.replace(batch, response_ids=ids)


def freeze(model: RecurrentLM) -> RecurrentLM:
    """Eval mode, no parameter requires grad: the base model is never trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Tensor]:
    state = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def _set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    if "rng.python" in meta:
        version, internal, gauss = json.loads(meta["rng.python"])
        random.setstate((version, tuple(internal), gauss))


def nonfinite(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity (one device sync for all)."""
    named = list(named)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def tensor_digest(tensors: dict[str, Tensor], meta: dict[str, str] | None = None) -> str:
    """sha256 over the tensors in sorted key order (each one's name, dtype, shape and
    bytes) and then the metadata entries in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        # the header fixes where each tensor's bytes end, so no two layouts hash alike
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for key in sorted(meta or {}):
        h.update(json.dumps([key, meta[key]]).encode())
    return h.hexdigest()


#: RWKV4Config fields that do not change the function the model computes.
_CARRIED_ONLY = ("bos_token_id", "eos_token_id", "context_length")


def base_identity(model: RecurrentLM) -> dict:
    """What a generator is tied to: the base model's class, its config (sizes and
    every setting that changes its function) and a sha256 of its weights."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _CARRIED_ONLY}
    return {"architecture": type(model).__name__, "config": config,
            "weights_sha256": tensor_digest(model.state_dict())}


def check_base(meta: dict[str, str], model: RecurrentLM, path: str | Path,
               identity: dict | None = None) -> None:
    """ValueError naming what differs when the checkpoint at ``path`` (its ``meta``)
    was trained on another base model than ``model`` (``identity``: its
    :func:`base_identity`, when already known)."""
    if "base_model" not in meta:
        log.warning("%s records no base model (written by an older prosg): cannot check that it belongs to "
                    "this one", path)
        return
    want, got = json.loads(meta["base_model"]), identity or base_identity(model)
    pairs = {"architecture": (want["architecture"], got["architecture"])}
    pairs.update((k, (want["config"].get(k), got["config"].get(k))) for k in sorted({*want["config"], *got["config"]}))
    diffs = [f"{k} {a!r} vs {b!r}" for k, (a, b) in pairs.items() if a != b]
    if want["weights_sha256"] != got["weights_sha256"]:
        diffs.append(f"weights sha256 {want['weights_sha256'][:16]}... vs {got['weights_sha256'][:16]}...")
    if diffs:
        raise ValueError(f"{path} was trained on another base model: {'; '.join(diffs)} (its base vs the one "
                         "given); use the --base it was trained on")


def save_checkpoint(path: Path, generator: SyntheticGradientGenerator, optimizer: torch.optim.Optimizer | None,
                    step: int, config: TrainConfig | None, base: dict | None = None) -> None:
    """Writes generator weights (``generator.*``), AdamW's state (``optim.<i>.<key>``,
    its param groups in the metadata), the step, RNG states, the base model's identity
    ``base`` (:func:`base_identity`) and a checksum; atomically (a temporary file
    renamed), so a kill mid-write leaves the previous checkpoint intact. Refuses
    non-finite weights: a checkpoint is only ever replaced by a usable one."""
    from safetensors.torch import save_file

    tensors = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    meta = {"format": FORMAT, "step": str(step), "generator_config": json.dumps(generator.config.to_dict()),
            "rng.python": json.dumps(random.getstate())}
    if config is not None:  # None: a generator saved outside training (save_pretrained)
        meta["train_config"] = config.to_json()
    if base is not None:
        meta["base_model"] = json.dumps(base, sort_keys=True)
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, st in sd["state"].items():
            for key, value in st.items():
                t = value if isinstance(value, Tensor) else torch.tensor(value)
                tensors[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous()
        meta["optim.param_groups"] = json.dumps(sd["param_groups"])
        tensors.update({k: v.cpu() for k, v in _rng_state().items()})
    bad = nonfinite(tensors.items())
    if bad:
        raise TrainingDiverged(f"not writing {path}: non-finite values in {bad[:3]}")
    meta["sha256"] = tensor_digest(tensors, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a checkpoint, verified: ValueError naming the file
    when it is not one, is truncated, fails its checksum or holds non-finite values."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no generator checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a prosg generator checkpoint (metadata format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is corrupt or truncated (not a readable safetensors file: {e})") from None
    recorded = meta.get("sha256")
    if recorded is None:
        log.warning("%s has no checksum (written by an older prosg): its bytes are not verified", path)
    elif tensor_digest(tensors, {k: v for k, v in meta.items() if k != "sha256"}) != recorded:
        raise ValueError(f"{path} is corrupt: its contents do not match the checksum written with it")
    bad = nonfinite(tensors.items())
    if bad:
        raise ValueError(f"{path} is corrupt: non-finite values in {bad[:3]}" + (" ..." if len(bad) > 3 else ""))
    return tensors, meta


def generator_from_checkpoint(tensors: dict[str, Tensor], meta: dict[str, str], model: RecurrentLM,
                              path: str | Path) -> SyntheticGradientGenerator:
    """The generator a :func:`read_checkpoint` result holds, for ``model`` (checked to be
    the base it was trained on), in eval mode."""
    check_base(meta, model, path)
    generator = SyntheticGradientGenerator(model, GeneratorConfig.from_dict(json.loads(meta["generator_config"])))
    generator.load_state_dict({k.removeprefix("generator."): v for k, v in tensors.items()
                               if k.startswith("generator.")})
    return generator.to(model.device).eval()


def load_generator(path: str | Path, model: RecurrentLM) -> SyntheticGradientGenerator:
    """A trained generator from a checkpoint (``checkpoint.safetensors`` or the final
    ``generator.safetensors``), for ``model`` (the base it was trained on), in eval mode."""
    return generator_from_checkpoint(*read_checkpoint(path), model, path)


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim.param_groups"])})


# --------------------------------------------------------------------------- training


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; 1 process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _launched_distributed() -> bool:
    """Under torchrun (which sets WORLD_SIZE, also for one process): run through a
    process group and DistributedDataParallel."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def refuse_run_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """FileExistsError when training into ``out_dir`` would replace a run there: any
    run without ``resume`` or ``overwrite``, and with ``resume`` a finished generator
    whose checkpoint is gone (a fresh start would replace it)."""
    out_dir = Path(out_dir)
    if overwrite:
        return
    if not resume:
        refuse_existing(out_dir, RUN_FILES, "a training run", "--resume to continue it, --overwrite to replace it,")
    elif not (out_dir / CHECKPOINT).exists():
        refuse_existing(out_dir, [GENERATOR], f"a trained generator but no {CHECKPOINT} to resume from")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class Run:
    """Where this process trains: its rank among torchrun's processes (one process
    otherwise), its device, and whether it runs through a process group (then the
    ranks agree on every stop and only rank 0 writes the run folder)."""

    rank: int
    world: int
    device: torch.device
    distributed: bool
    owns_group: bool = False  # the process group was created here, so it is destroyed here

    @property
    def writes(self) -> bool:
        return self.rank == 0


def start_run(device: str | torch.device | None) -> Run:
    """The :class:`Run` of this process: ``device`` (default: this rank's GPU, else the
    CPU), and under torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` set, any world size) a
    process group unless one exists."""
    rank, world, local_rank = _distributed()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Run(rank, world, device, distributed=_launched_distributed())
    if run.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            run.owns_group = True
    return run


def end_run(run: Run) -> None:
    if run.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


@dataclass
class Progress:
    """What the loop carries from step to step."""

    generator: SyntheticGradientGenerator
    optimizer: torch.optim.Optimizer
    step: int  # completed optimizer steps
    saved_step: int | None  # the step of the checkpoint on disk (for the divergence message)
    history: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def train(model: RecurrentLM, config: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          overwrite: bool = False, device: str | torch.device | None = None, save_every: int = 100,
          log_every: int = 10, progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
          pairs: list[TokenizedPair] | None = None, tokenizer=None, base_path: str | None = None) -> dict:
    """Trains a generator for the frozen ``model`` and writes ``out_dir``:
    ``checkpoint.safetensors`` (latest, resumable), ``generator.safetensors`` (final
    weights), ``train_log.jsonl`` (one line per logged step) and ``train_config.json``.

    ``out_dir`` must not hold a run unless ``resume`` (continue it from its checkpoint)
    or ``overwrite`` (delete it first); see :func:`refuse_run_dir`. While training, the
    folder is locked against other processes. A non-finite loss, gradient or weight
    raises :class:`TrainingDiverged` and leaves the files of the last good step as
    they were.

    ``on_step(step, record)`` is called after every optimizer step (``step`` counts
    completed steps). Under torchrun a process group is created here unless one exists
    (and then destroyed at the end); see :func:`start_run`.

    With ``config.data_file`` the examples are user (prompt, response) pairs
    (:func:`load_user_data`; ``pairs`` and ``tokenizer`` when already loaded), else the
    benchmark of ``config.data``. The final generator is written as a generator
    directory (:mod:`prosg.method.pretrained`: ``generator.safetensors`` and
    ``generator_config.json`` with the tokenizer; ``base_path`` is recorded as where the
    base model loads from).

    Returns ``{"generator", "history" (logged records), "final_step"}``.
    """
    _positive_int("save_every", save_every)
    _positive_int("log_every", log_every)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other (continue the run in out_dir, or replace it)")
    out_dir = Path(out_dir)
    if _distributed()[0] == 0:  # the other ranks would race with its first writes
        refuse_run_dir(out_dir, resume, overwrite)
    # The data is read (and every line checked) before anything is created or written.
    if config.data_file:
        if pairs is None:
            pairs, tokenizer = load_user_data(config, tokenizer)
        too_big = max(max(p.prompt_ids + p.response_ids) for p in pairs)
        if too_big >= model.config.vocab_size:
            raise ValueError(f"{config.data_file}: the tokenizer gives id {too_big}, outside the base model's "
                             f"vocabulary of {model.config.vocab_size}: the tokenizer does not belong to this model")
    elif tokenizer is None:
        from prosg.data.text import BenchmarkTokenizer

        tokenizer = BenchmarkTokenizer()
    run = start_run(device)
    try:
        freeze(model).to(run.device)
        base = base_identity(model)  # of the weights as given (before a bfloat16 cast)
        if config.precision == "bfloat16" and model.dtype != torch.bfloat16:
            model.to_dtype(torch.bfloat16)
        # Only rank 0 writes, so only it holds the folder (the other ranks would lock it out).
        with locked(out_dir) if run.writes else contextlib.nullcontext():
            # -- the generator: fresh, or where the checkpoint left it
            state = init_or_resume(model, config, out_dir, run, resume, overwrite, base)
            objective = _objective(state.generator, model, run, config)
            data = config.data_config() if pairs is None else None
            # -- the loop
            from tqdm.auto import tqdm

            first = state.step
            # closed on an error too: a bar left open would run into the error line
            with tqdm(total=config.steps, initial=first, disable=None if (progress and run.writes) else True, desc="prosg train",
                      dynamic_ncols=True) as bar:
                for step in range(first, config.steps):
                    if pairs is not None:
                        batch = user_batch(pairs, config, step, run.rank, run.world).to(run.device)
                    else:
                        batch = make_batch(data, config.data_seed, batch_indices(config, step, run.rank, run.world),
                                           filler_loss=config.filler_loss, span_start_weight=config.span_start_weight,
                                           span_start_tokens=config.span_start_tokens).to(run.device)
                    record, prefix = train_step(objective, state, model, batch, lr_at(config, step), config, run,
                                                out_dir)
                    log_and_save(record, state, model, batch, prefix, config, run, out_dir, base,
                                 log_step=step == first or state.step % log_every == 0 or state.step == config.steps,
                                 save_step=state.step % save_every == 0 or state.step == config.steps)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if on_step is not None:
                        on_step(state.step, record)
            # -- the final generator
            state.generator.base_identity = base
            state.generator.tokenizer = tokenizer
            if run.writes:
                from prosg.method.pretrained import write_config

                save_checkpoint(out_dir / GENERATOR, state.generator, None, config.steps, config, base)
                write_config(out_dir, state.generator, base, tokenizer=tokenizer, base_path=base_path,
                             train_config=asdict(config))
        state.generator.eval()
        return {"generator": state.generator, "history": state.history, "final_step": config.steps}
    finally:
        end_run(run)


def saved_train_config(text: str) -> dict:
    """A checkpoint's TrainConfig (its JSON) as a dict; a field added since it was
    written reads as its default, which is the behaviour of the code that wrote it."""
    return {**json.loads(TrainConfig().to_json()), **json.loads(text)}


def init_or_resume(model: RecurrentLM, config: TrainConfig, out_dir: Path, run: Run, resume: bool,
                   overwrite: bool, base: dict) -> Progress:
    """A fresh generator and AdamW from ``config.seed``, or with ``resume`` the ones of
    ``out_dir``'s checkpoint (weights, optimizer, RNG states and step; its settings and
    base model must be this run's). Prepares the folder: replaced with ``overwrite``,
    the config written, the log started or cut back to the checkpoint's step."""
    if run.writes:
        refuse_run_dir(out_dir, resume, overwrite)  # again: another run may have finished meanwhile
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    generator = SyntheticGradientGenerator(model, config.generator_config()).to(run.device)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = Progress(generator, optimizer, step=0, saved_step=None)
    ckpt = out_dir / CHECKPOINT
    if resume and ckpt.is_file():
        tensors, meta = read_checkpoint(ckpt)
        saved = saved_train_config(meta["train_config"])
        if saved != json.loads(config.to_json()):
            diff = sorted(k for k in set(saved) | set(asdict(config)) if saved.get(k) != asdict(config).get(k))
            raise ValueError(f"--resume: {ckpt} was written by a run with a different configuration "
                             f"(fields {diff}); use the same settings or another --out")
        check_base(meta, model, ckpt, base)
        generator.load_state_dict({k.removeprefix("generator."): v for k, v in tensors.items()
                                   if k.startswith("generator.")})
        _load_optimizer(optimizer, tensors, meta)
        _set_rng_state(tensors, meta)
        state.step = state.saved_step = int(meta["step"])
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)
    if run.writes:
        atomic_write_text(out_dir / CONFIG_FILE, json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
        if state.step == 0:
            atomic_write_text(out_dir / LOG_FILE, "")
        else:
            _trim_log(out_dir / LOG_FILE, state.step)
    log.info("generator: %d parameters, targets %s, rank %d; base model frozen (%d parameters)",
             generator.num_parameters(), generator.targets, generator.config.rank,
             sum(p.numel() for p in model.parameters()))
    return state


def _objective(generator: SyntheticGradientGenerator, model: RecurrentLM, run: Run,
               config: TrainConfig | None = None) -> nn.Module:
    objective: nn.Module = _Objective(generator, model, config)
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: the module lives on one device and the inputs already do, so
        # DDP need not move them (its scatter does not know Batch or the model's state).
        objective = DistributedDataParallel(objective, device_ids=None)
    return objective


def train_step(objective: nn.Module, state: Progress, model: RecurrentLM, batch: Batch, lr: float,
               config: TrainConfig, run: Run, out_dir: Path) -> tuple[dict, RecurrentState | None]:
    """One optimizer step of the generator on ``batch`` at ``lr``. Raises
    :class:`TrainingDiverged` (on every rank alike) before a non-finite loss or
    gradient reaches the weights, or when the update made them non-finite. Returns the
    step's record and the batch's prefix state (for the base loss of a logged step)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.generator.train()
    prefix = prefix_state(model, batch.prompt_ids, batch.prompt_lengths)
    loss = objective(batch, prefix)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.generator.parameters(), config.grad_clip or float("inf"))
    done = state.step + 1
    if not _all_finite([loss, grad_norm], run.distributed):
        raise _diverged(state, out_dir, done, f"loss {float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}",
                        lr)
    state.optimizer.step()
    if not _all_finite(list(state.generator.parameters()), run.distributed):
        raise _diverged(state, out_dir, done,
                        f"the update made {nonfinite(state.generator.named_parameters())[:3]} non-finite", lr)
    state.step = done
    return {"step": done, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm)}, prefix


def log_and_save(record: dict, state: Progress, model: RecurrentLM, batch: Batch, prefix: RecurrentState | None,
                 config: TrainConfig, run: Run, out_dir: Path, base: dict, *, log_step: bool,
                 save_step: bool) -> None:
    """A logged step gets the base model's loss on the same batch (no delta) and the
    elapsed time, and a line in the log (rank 0); a saved step replaces the checkpoint
    (rank 0, atomically)."""
    if log_step:
        with torch.no_grad():
            record["base_loss"] = float(response_loss(model, batch, None, prefix, chunk_length=config.chunk_length))
        record["elapsed_s"] = round(time.perf_counter() - state.started, 2)
        state.history.append(record)
        if run.writes:
            with open(out_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("step %d loss %.4f (base %.4f) lr %.2e grad %.3f", record["step"], record["loss"],
                      record["base_loss"], record["lr"], record["grad_norm"])
    if save_step and run.writes:
        save_checkpoint(out_dir / CHECKPOINT, state.generator, state.optimizer, state.step, config, base)
        state.saved_step = state.step


def _diverged(state: Progress, out_dir: Path, step: int, what: str, lr: float) -> TrainingDiverged:
    kept = (f"{out_dir / CHECKPOINT} (step {state.saved_step}) is kept as it was" if state.saved_step is not None
            else "no checkpoint had been written")
    return TrainingDiverged(f"training diverged at step {step}: {what} (lr {lr:.3g}); nothing of this step "
                            f"was saved, {kept}; try a lower --lr or a --grad-clip")


def _trim_log(path: Path, step: int) -> None:
    """Keeps the records of steps up to ``step`` (those after it are replayed by the
    resumed run) and drops a line torn by a kill mid-write; atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _all_finite(values: list[Tensor], distributed: bool) -> bool:
    """Whether every value is finite on every rank: the ranks must agree on stopping,
    or the ones that go on wait forever for the others at the next all-reduce."""
    ok = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().to(torch.int32)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)
