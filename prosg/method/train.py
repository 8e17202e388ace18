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
with the configs in the safetensors metadata. ``resume=True`` continues from it and
gives the same weights as an uninterrupted run (tests/test_train.py checks it).

Multi-GPU: run under ``torchrun``; then (any ``WORLD_SIZE``) the generator is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU) and each rank takes its slice of the
global batch. The loss is averaged per rank, then DDP averages the gradients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.data import IGNORE_INDEX, Batch, MultiStageConfig, collate, encode_example, generate_example
from prosg.data.vocab import benchmark_tokenizer
from prosg.method.generator import GeneratorConfig, SyntheticGradientGenerator
from prosg.models import RWKV4LM, RWKV4State

log = logging.getLogger("prosg.train")

CHECKPOINT = "checkpoint.safetensors"
GENERATOR = "generator.safetensors"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in every checkpoint; a resumed
    run must match it)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    filler_loss: bool = True  # False: no loss on ramble filler words (see make_batch)
    seed: int = 0
    data_seed: int = 0
    data: dict = field(default_factory=dict)  # MultiStageConfig fields
    generator: dict = field(default_factory=dict)  # GeneratorConfig fields

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"TrainConfig.{name} must be an int >= {0 if name == 'warmup_steps' else 1}, got {v!r}")
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite float >= 0, got {v!r}")

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


def make_batch(data: MultiStageConfig, seed: int, indices: range | list[int], *, filler_loss: bool = True) -> Batch:
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
    return batch


def batch_indices(config: TrainConfig, step: int, rank: int, world: int) -> range:
    start = (step * world + rank) * config.batch_size
    return range(start, start + config.batch_size)


# --------------------------------------------------------------------------- loss


@torch.no_grad()
def prefix_state(model: RWKV4LM, prompt_ids: Tensor, prompt_lengths: Tensor) -> RWKV4State | None:
    """The base model's state after all but the last token of each (right-padded)
    prompt, without delta; rows of equal length run together, so no pad ever enters a
    state. None when every prompt is one token (the empty state)."""
    B = prompt_ids.shape[0]
    cfg = model.config
    lengths = prompt_lengths.tolist()
    if all(n == 1 for n in lengths):
        return None
    state = RWKV4State.zeros(cfg.num_hidden_layers, B, cfg.hidden_size, cfg.attention_hidden_size,
                             dtype=model.dtype, device=model.device)
    for n in sorted(set(lengths) - {1}):
        rows = torch.tensor([b for b in range(B) if lengths[b] == n], dtype=torch.long, device=model.device)
        _, s = model(prompt_ids.index_select(0, rows)[:, : n - 1], logits_to_keep=1)
        state.att_shift.index_copy_(1, rows, s.att_shift)
        state.ffn_shift.index_copy_(1, rows, s.ffn_shift)
        state.wkv.index_copy_(1, rows, s.wkv)
    return state


def continuation(batch: Batch) -> tuple[Tensor, Tensor]:
    """``[B, 1 + R]`` ids ``prompt[-1] ‖ response`` (right-padded) and their labels
    (the response tokens, IGNORE_INDEX at pads), from a right-padded batch."""
    if batch.prompt_padding != "right":
        raise ValueError("the training batch must be right-padded (Collator(..., prompt_padding='right'))")
    B, R = batch.response_ids.shape
    last = batch.prompt_ids.gather(1, (batch.prompt_lengths - 1).clamp(min=0).unsqueeze(1))
    ids = torch.cat([last, batch.response_ids], 1)
    # The response's labels as batch.labels has them (so positions masked there, e.g.
    # filler words, stay without loss), re-laid out like response_ids.
    cols = (batch.response_start.unsqueeze(1) + torch.arange(R, device=ids.device)).clamp(
        max=batch.labels.shape[1] - 1)
    response_labels = batch.labels.gather(1, cols).masked_fill(~batch.response_mask, IGNORE_INDEX)
    labels = torch.cat([torch.full_like(last, IGNORE_INDEX), response_labels], 1)
    return ids, labels


def response_loss(model: RWKV4LM, batch: Batch, delta=None, state: RWKV4State | None = None) -> Tensor:
    """Mean next-token cross-entropy over the response tokens of a right-padded batch,
    with ``delta`` applied from each prompt's last token on (the convention of
    :func:`prosg.method.evaluation.evaluate`): the prompt but its last token is read by
    the base model (``state``: :func:`prefix_state`, computed when not given), then
    ``prompt[-1] ‖ response`` runs under the delta."""
    if state is None:
        state = prefix_state(model, batch.prompt_ids, batch.prompt_lengths)
    ids, labels = continuation(batch)
    logits, _ = model(ids, state=state, delta=delta)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class _Objective(nn.Module):
    """The generator plus the loss, as one module for DDP. The frozen base model is
    held outside the module tree (DDP must neither broadcast nor reduce it)."""

    def __init__(self, generator: SyntheticGradientGenerator, model: RWKV4LM):
        super().__init__()
        self.generator = generator
        self._model = [model]

    def forward(self, batch: Batch, state: RWKV4State | None) -> Tensor:
        model = self._model[0]
        delta = self.generator(model, batch.prompt_ids, batch.prompt_mask)
        return response_loss(model, batch, delta, state)


def freeze(model: RWKV4LM) -> RWKV4LM:
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


def save_checkpoint(path: Path, generator: SyntheticGradientGenerator, optimizer: torch.optim.Optimizer | None,
                    step: int, config: TrainConfig) -> None:
    """Writes generator weights (``generator.*``), AdamW's state (``optim.<i>.<key>``,
    its param groups in the metadata), the step and RNG states; atomically (a temporary
    file renamed), so a kill mid-write leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    tensors = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    meta = {"format": "prosg.generator/1", "step": str(step), "train_config": config.to_json(),
            "generator_config": json.dumps(generator.config.to_dict()),
            "rng.python": json.dumps(random.getstate())}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, st in sd["state"].items():
            for key, value in st.items():
                t = value if isinstance(value, Tensor) else torch.tensor(value)
                tensors[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous()
        meta["optim.param_groups"] = json.dumps(sd["param_groups"])
        tensors.update({k: v.cpu() for k, v in _rng_state().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no generator checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "prosg.generator/1":
            raise ValueError(f"{path} is not a prosg generator checkpoint (metadata format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def load_generator(path: str | Path, model: RWKV4LM) -> SyntheticGradientGenerator:
    """A trained generator from a checkpoint (``checkpoint.safetensors`` or the final
    ``generator.safetensors``), for ``model`` (the base it was trained on), in eval mode."""
    tensors, meta = read_checkpoint(path)
    generator = SyntheticGradientGenerator(model, GeneratorConfig.from_dict(json.loads(meta["generator_config"])))
    generator.load_state_dict({k.removeprefix("generator."): v for k, v in tensors.items()
                               if k.startswith("generator.")})
    return generator.to(model.device).eval()


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


def train(model: RWKV4LM, config: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          device: str | torch.device | None = None, save_every: int = 100, log_every: int = 10,
          progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Trains a generator for the frozen ``model`` and writes ``out_dir``:
    ``checkpoint.safetensors`` (latest, resumable), ``generator.safetensors`` (final
    weights), ``train_log.jsonl`` (one line per logged step) and ``train_config.json``.

    ``on_step(step, record)`` is called after every optimizer step (``step`` counts
    completed steps). Under torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` set, any world
    size) a process group is created here unless one exists (and then destroyed at the end).

    Returns ``{"generator", "history" (logged records), "final_step"}``.
    """
    out_dir = Path(out_dir)
    rank, world, local_rank = _distributed()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed = _launched_distributed()
    created = False
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            created = True
    try:
        return _train(model, config, out_dir, resume, device, rank, world, save_every, log_every,
                      progress and rank == 0, on_step, distributed)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(model, config, out_dir, resume, device, rank, world, save_every, log_every, progress, on_step,
           distributed) -> dict:
    from tqdm.auto import tqdm

    freeze(model).to(device)
    data = config.data_config()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    generator = SyntheticGradientGenerator(model, config.generator_config()).to(device)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    ckpt = out_dir / CHECKPOINT
    if resume and ckpt.is_file():
        tensors, meta = read_checkpoint(ckpt)
        saved = json.loads(meta["train_config"])
        if saved != json.loads(config.to_json()):
            diff = sorted(k for k in set(saved) | set(asdict(config)) if saved.get(k) != asdict(config).get(k))
            raise ValueError(f"--resume: {ckpt} was written by a run with a different configuration "
                             f"(fields {diff}); use the same settings or another --out")
        generator.load_state_dict({k.removeprefix("generator."): v for k, v in tensors.items()
                                   if k.startswith("generator.")})
        _load_optimizer(optimizer, tensors, meta)
        _set_rng_state(tensors, meta)
        start = int(meta["step"])
        log.info("resumed from %s at step %d", ckpt, start)
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
        if start == 0:
            (out_dir / LOG_FILE).write_text("")
    objective: nn.Module = _Objective(generator, model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: the module lives on one device and the inputs already do, so
        # DDP need not move them (its scatter does not know Batch/RWKV4State).
        objective = DistributedDataParallel(objective, device_ids=None)
    log.info("generator: %d parameters, targets %s, rank %d; base model frozen (%d parameters)",
             generator.num_parameters(), generator.targets, generator.config.rank,
             sum(p.numel() for p in model.parameters()))

    history: list[dict] = []
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="prosg train", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(start, config.steps):
        batch = make_batch(data, config.data_seed, batch_indices(config, step, rank, world),
                           filler_loss=config.filler_loss).to(device)
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator.train()
        state = prefix_state(model, batch.prompt_ids, batch.prompt_lengths)
        loss = objective(batch, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(generator.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        done = step + 1
        record = {"step": done, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm)}
        if done % log_every == 0 or done == config.steps or step == start:
            with torch.no_grad():
                record["base_loss"] = float(response_loss(model, batch, None, state))  # same batch, no delta
            record["elapsed_s"] = round(time.perf_counter() - t0, 2)
            history.append(record)
            if rank == 0:
                with open(out_dir / LOG_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("step %d loss %.4f (base %.4f) lr %.2e grad %.3f", done, record["loss"],
                         record["base_loss"], lr, record["grad_norm"])
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if rank == 0 and (done % save_every == 0 or done == config.steps):
            save_checkpoint(ckpt, generator, optimizer, done, config)
        if on_step is not None:
            on_step(done, record)
    bar.close()
    if rank == 0:
        save_checkpoint(out_dir / GENERATOR, generator, None, config.steps, config)
    generator.eval()
    return {"generator": generator, "history": history, "final_step": config.steps}
