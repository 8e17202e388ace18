"""Pretraining the tiny base models of the forgetting benchmark (RWKV-4 and RWKV-7).

A base model is what ProSG is applied to: an RWKV-4 or RWKV-7 trained from scratch, by
teacher forcing, on the multi-stage benchmark (docs/benchmark.md). The bundled
``rwkv4`` and ``rwkv7`` bases are trained with full back-propagation through each whole
example (``bptt=0``): every gradient that could teach them to keep an instruction to
its stage is there, and what they still forget, they forget because a fixed-size state
written by every token cannot hold five instructions over a long response. The
``rwkv4_tbptt`` control was trained with 32-token truncated back-propagation instead
(its forgetting is induced: no gradient ever reached back further). ``prosg pretrain
--arch rwkv4|rwkv7 --setting long --out DIR`` rebuilds one (the exact command of each
is in its ``train_config.json``); :func:`load_base_model` loads them, and
docs/base_model.md records how each was trained and what it scores.

Determinism: the weights are initialised after ``torch.manual_seed(seed)``, and the
training examples of step ``s`` are examples ``s*B .. (s+1)*B-1`` of the benchmark's
seed ``data_seed`` (each drawn from its own hash-seeded stream, independent of the
platform), so a run is a function of its :class:`PretrainConfig`. On one machine with
one torch build and thread count it is bitwise repeatable; across builds the float
rounding of the kernels may differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from prosg.data.batching import IGNORE_INDEX, Collator
from prosg.data.multistage import SETTINGS, MultiStageConfig, encode_example, generate_examples, setting
from prosg.data.vocab import benchmark_tokenizer
from prosg.method.outputs import atomic_write_text, locked, refuse_existing
from prosg.method.train import TrainingDiverged, nonfinite
from prosg.models import RWKV4Config, RWKV4LM, RWKV7Config, RWKV7LM
from prosg.models.protocol import RecurrentLM

#: The benchmark setting a base model is trained on by default (``--setting``): the
#: naturally forgetting bundled RWKV-4's (``PretrainConfig()`` rebuilds ``bundled:rwkv4``).
BASE_BENCHMARK = SETTINGS["long"]

#: The architectures ``prosg pretrain`` builds.
ARCHS = ("rwkv4", "rwkv7")
#: The base models bundled with prosg (folders of ``prosg/assets``; docs/base_model.md):
#: ``rwkv4`` (the ``long`` setting) and ``rwkv7`` (``many``) were trained with full
#: back-propagation, so what they forget their state could not hold; ``rwkv4_tbptt``
#: (``standard``) is the control whose forgetting was induced by truncated
#: back-propagation. ``--base bundled:NAME`` picks one; plain ``bundled`` (and no
#: ``--base``) is :data:`DEFAULT_BASE`: the control, the one base on which ProSG's gain
#: is established (docs/results.md: +44.8 points on the last stage; on the naturally
#: forgetting bases it is a few points).
BUNDLED_BASES = ("rwkv4", "rwkv7", "rwkv4_tbptt")
DEFAULT_BASE = "rwkv4_tbptt"
BUNDLED_PREFIX = "bundled"
TRAIN_CONFIG_FILE = "train_config.json"
#: What :func:`save_base_model` writes: their presence means the folder holds a model.
MODEL_FILES = ("config.json", "model.safetensors", TRAIN_CONFIG_FILE)


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on (written to ``train_config.json``).

    Model: ``arch`` (``rwkv4``: :class:`RWKV4LM`; ``rwkv7``: :class:`RWKV7LM`, heads of
    ``head_size``, BlinkDL's x070 initialisation and low-rank widths), ``hidden_size``,
    ``num_layers``, ``intermediate_size`` (None: 4x hidden).
    Data: ``benchmark`` (the task), ``data_seed`` (benchmark seed of the training
    stream; evaluate on other seeds), ``train_on_prompt`` (also predict prompt tokens:
    they are random draws, so this only adds noise; off by default).
    Optimisation: AdamW with ``lr`` (linear warm-up over ``warmup_steps``, cosine decay
    to ``min_lr_ratio * lr`` at ``steps``), ``weight_decay`` on matrices only,
    ``betas``, gradient norm clipped at ``grad_clip``; ``batch_size`` examples a step.
    ``repeat_prompt_every``: every n-th training example (0: none) reads its prompt
    twice (:func:`prosg.method.evaluation.repeat_prompt`), so the "repeat the prompt"
    baseline is evaluated on a format the model knows.
    ``bptt``: truncated back-propagation through time: the sequence runs in chunks of
    ``bptt`` tokens, each starting from the previous chunk's state *detached*; 0 (the
    default): full back-propagation through each whole example. The bundled bases use
    0, so that what they forget is what their state cannot hold; the ``rwkv4_tbptt``
    control uses 32: the forward pass carries the prompt forward without limit, but no
    gradient ever teaches the model to keep something longer than 32 tokens (induced
    forgetting, docs/base_model.md).
    ``seed``: torch seed of the initialisation. ``threads``: torch CPU threads while
    training (None: leave torch's setting). Default 1: the tensors of a tiny model are
    too small to split well, and on a shared machine two threads that wait on each
    other at every op run several times slower than one (benchmarks/RESULTS.md, "Choices
    in the code"). Results are bitwise repeatable for a fixed thread count.
    """

    seed: int = field(default=0, metadata={"help": "torch seed of the initialisation", "min": 0})
    arch: str = field(default="rwkv4", metadata={"help": "architecture of the base model", "choices": ARCHS})
    data_seed: int = 0
    benchmark: MultiStageConfig = field(default_factory=lambda: BASE_BENCHMARK)
    hidden_size: int = field(default=64, metadata={"help": "model width", "min": 1})
    num_layers: int = field(default=3, metadata={"help": "blocks", "min": 1})
    head_size: int = field(default=16, metadata={"help": "RWKV-7 head size N (16, 32, 64 or 128)", "min": 1})
    intermediate_size: int | None = None
    steps: int = field(default=3500, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "examples per step", "min": 1})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)", "min": 0, "above": True})
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    train_on_prompt: bool = False
    repeat_prompt_every: int = 8
    bptt: int = field(default=0, metadata={"help": "truncated BPTT chunk, tokens (0: full back-propagation)", "min": 0})
    threads: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.benchmark, dict):
            self.benchmark = MultiStageConfig.from_dict(self.benchmark)
        self.betas = tuple(self.betas)
        if self.arch not in ARCHS:
            raise ValueError(f"PretrainConfig.arch must be one of {list(ARCHS)}, got {self.arch!r}")
        for name in ("hidden_size", "num_layers", "steps", "batch_size", "head_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PretrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("seed", "data_seed", "warmup_steps", "repeat_prompt_every", "bptt"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"PretrainConfig.{name} must be an int >= 0, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"PretrainConfig.lr must be a positive float, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"PretrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"PretrainConfig.grad_clip must be > 0, got {self.grad_clip!r}")

    def model_config(self) -> RWKV4Config | RWKV7Config:
        tok = benchmark_tokenizer()
        if self.arch == "rwkv7":
            C = self.hidden_size

            def lora(factor: float, power: float) -> int:
                # BlinkDL's x070 training sizes of the w/a/v/g low-rank MLPs (multiples of 32)
                return max(32, round(factor * C ** power / 32) * 32)

            return RWKV7Config(vocab_size=tok.vocab_size, hidden_size=C, num_hidden_layers=self.num_layers,
                               head_size=self.head_size, intermediate_size=self.intermediate_size,
                               decay_low_rank_dim=lora(1.8, 0.5), a_low_rank_dim=lora(1.8, 0.5),
                               v_low_rank_dim=lora(1.3, 0.5), gate_low_rank_dim=lora(0.6, 0.8),
                               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        return RWKV4Config(
            vocab_size=tok.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            # No rescaling: it only matters for float16 inference of deep models, and
            # without it train and eval modes compute the same function.
            rescale_every=0,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            context_length=512,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["benchmark"] = self.benchmark.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PretrainConfig: unknown field(s) {unknown}")
        return cls(**d)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(cfg: PretrainConfig, step: int, collator: Collator):
    """The batch of step ``step``: examples ``step*B ..`` of seed ``data_seed``."""
    from prosg.method.evaluation import repeat_prompt

    start = step * cfg.batch_size
    examples = generate_examples(cfg.benchmark, cfg.batch_size, seed=cfg.data_seed, start=start)
    pairs = []
    for i, e in enumerate(examples):
        pair = encode_example(e)
        if cfg.repeat_prompt_every and (start + i) % cfg.repeat_prompt_every == cfg.repeat_prompt_every - 1:
            pair.prompt_ids = benchmark_tokenizer().encode(repeat_prompt(e))
        pairs.append(pair)
    return collator(pairs)


def build_model(cfg: PretrainConfig) -> RWKV4LM | RWKV7LM:
    """A freshly initialised model of ``cfg``'s architecture and shape (torch's RNG)."""
    config = cfg.model_config()
    return RWKV7LM(config) if cfg.arch == "rwkv7" else RWKV4LM(config)


def lm_loss(model: RecurrentLM, batch, bptt: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (HF convention:
    logits at t-1 predict labels[t]). Right padding: pads only follow real tokens, so
    they never reach the state of a labelled position. ``bptt > 0``: truncated
    back-propagation in chunks of ``bptt`` tokens (the state crosses chunk borders
    detached); the loss is the same function of the weights, only its gradient is cut."""
    ids = batch.input_ids
    targets = batch.labels[:, 1:]
    if bptt <= 0 or bptt >= ids.shape[1]:
        logits, _ = model(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               targets.reshape(-1), ignore_index=IGNORE_INDEX)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    total = ids.new_zeros((), dtype=torch.float32)
    state = None
    T = ids.shape[1] - 1  # positions that predict something
    for start in range(0, T, bptt):
        stop = min(start + bptt, T)
        logits, state = model(ids[:, start:stop], state=state)
        state = state.detach()
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                        targets[:, start:stop].reshape(-1), ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total / count


def _param_groups(model: RecurrentLM, weight_decay: float) -> list[dict]:
    # Decay only the projection/embedding matrices: decaying time_decay, time_first,
    # the mixes or LayerNorm affines would pull them toward meaningless values.
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(cfg: PretrainConfig, *, progress: bool = True, log_every: int = 50,
             history: list | None = None, callback=None) -> RWKV4LM | RWKV7LM:
    """Trains a fresh base model as ``cfg`` says; returns it in eval mode (float32, CPU).

    ``history``: when given, ``(step, loss)`` of every step is appended to it.
    ``callback(step, model)``: called after every optimizer step (e.g. checkpoints).
    """
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, progress, log_every, history, callback)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(cfg: PretrainConfig, progress: bool, log_every: int, history: list | None, callback) -> RecurrentLM:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    model.train()
    tok = benchmark_tokenizer()
    collator = Collator(tok.pad_id, prompt_padding="right", train_on_prompt=cfg.train_on_prompt,
                        vocab_size=tok.vocab_size)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain", unit="step", file=sys.stderr, dynamic_ncols=True)
    running = None
    try:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = training_batch(cfg, step, collator)
            loss = lm_loss(model, batch, cfg.bptt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise TrainingDiverged(f"pretraining diverged at step {step + 1}: loss {loss.item():.4g}, gradient "
                                       f"norm {grad_norm.item():.4g} (lr {lr_at(step, cfg):.3g}); try a lower --lr")
            opt.step()
            bad = nonfinite(model.named_parameters())
            if bad:
                raise TrainingDiverged(f"pretraining diverged at step {step + 1}: the update made {bad[:3]} "
                                       f"non-finite (lr {lr_at(step, cfg):.3g}); try a lower --lr")
            value = loss.item()
            if history is not None:
                history.append((step, value))
            if callback is not None:
                callback(step, model)
            running = value if running is None else 0.95 * running + 0.05 * value
            if bar is not None:
                bar.update(1)
                if step % log_every == 0 or step + 1 == cfg.steps:
                    bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step, cfg):.2e}")
    finally:
        if bar is not None:
            bar.close()
    return model.eval()


# --------------------------------------------------------------------------- the bundled model


def pretrain_command(cfg: PretrainConfig, out: str) -> str:
    """The ``prosg pretrain`` command line that trains ``cfg`` (flags for the fields that
    differ from the defaults; the benchmark as its setting's name when it is one)."""
    from prosg.data.multistage import setting_name

    default = PretrainConfig()
    parts, notes = ["prosg pretrain"], []
    for name in ("arch", "seed", "hidden_size", "num_layers", "head_size", "steps", "batch_size", "lr", "bptt"):
        if name == "head_size" and cfg.arch != "rwkv7":
            continue
        if getattr(cfg, name) != getattr(default, name) or name == "arch":
            parts.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}")
    if cfg.data_seed != cfg.seed:
        parts.append(f"--data-seed {cfg.data_seed}")
    if cfg.benchmark != default.benchmark:
        name = setting_name(cfg.benchmark)
        if name is not None:
            parts.append(f"--setting {name}")
        else:
            base, want = BASE_BENCHMARK.to_dict(), cfg.benchmark.to_dict()
            differ = [k for k in want if base[k] != want[k]]
            parts += [f"--{k.replace('_', '-')} {want[k]}" for k in differ if k in BENCHMARK_FLAGS]
            unflagged = [k for k in differ if k not in BENCHMARK_FLAGS]
            if unflagged:
                notes.append(f"benchmark fields {', '.join(unflagged)}")
    other = {f.name for f in dataclasses.fields(PretrainConfig)} - {
        "arch", "seed", "hidden_size", "num_layers", "head_size", "steps", "batch_size", "lr", "bptt", "data_seed",
        "benchmark", "threads"}
    changed = sorted(n for n in other if getattr(cfg, n) != getattr(default, n))
    if changed:
        notes.append(f"PretrainConfig fields {', '.join(changed)}")
    command = " ".join(parts + ["--out", out])
    # fields without a flag: only the recorded PretrainConfig reproduces them
    return command + (f"  # and {'; '.join(notes)} as recorded" if notes else "")


def save_base_model(model: RecurrentLM, cfg: PretrainConfig, out: str | Path, *, extra: dict | None = None) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and ``train_config.json`` to
    ``out``, each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained writes in place: write into a scratch folder, then rename each file over
    tmp = out / f".save.tmp{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"pretrain_config": cfg.to_dict(), "command": pretrain_command(cfg, out.name)}
    record.update(extra or {})
    atomic_write_text(out / TRAIN_CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def bundled_name(path: str | Path | None) -> str | None:
    """The bundled base ``path`` names (None, ``"bundled"`` or ``"bundled:NAME"``), or
    None when it is a directory path. An unknown NAME is a ValueError listing the names."""
    if path is None:
        return DEFAULT_BASE
    text = str(path)
    if text == BUNDLED_PREFIX:
        return DEFAULT_BASE
    if not text.startswith(BUNDLED_PREFIX + ":"):
        return None
    name = text.split(":", 1)[1]
    if name not in BUNDLED_BASES:
        raise ValueError(f"--base {text}: no bundled base model {name!r}; bundled: "
                         f"{', '.join(f'{BUNDLED_PREFIX}:{n}' for n in BUNDLED_BASES)}")
    return name


def load_base_model(path: str | Path | None = None, *, dtype: torch.dtype | None = None
                    ) -> tuple[RecurrentLM, MultiStageConfig]:
    """A bundled base model (``path`` None or ``"bundled"``: :data:`DEFAULT_BASE`;
    ``"bundled:NAME"``: one of :data:`BUNDLED_BASES`) or the one saved at ``path`` by
    ``prosg pretrain``, in eval mode, with the benchmark config it was trained on."""
    name = bundled_name(path)
    if name is not None:
        with resources.as_file(resources.files("prosg.assets") / name) as p:
            return _load(Path(p), dtype)
    return _load(Path(path), dtype)


def _load(path: Path, dtype: torch.dtype | None) -> tuple[RecurrentLM, MultiStageConfig]:
    record_path = path / TRAIN_CONFIG_FILE
    if not record_path.exists():
        raise FileNotFoundError(f"{path}: no {TRAIN_CONFIG_FILE} (not a model written by `prosg pretrain`)")
    record = json.loads(record_path.read_text())
    cfg = PretrainConfig.from_dict(record["pretrain_config"])
    from prosg.models.loading import load_model

    return load_model(path, dtype=dtype), cfg.benchmark


# --------------------------------------------------------------------------- command line


#: The benchmark fields ``prosg pretrain`` has a flag for.
BENCHMARK_FLAGS = ("min_stages", "max_stages", "stage_length", "ramble_length")


def _benchmark_from_args(args: argparse.Namespace) -> MultiStageConfig:
    d = (setting(args.setting) if args.setting else BASE_BENCHMARK).to_dict()
    for name in BENCHMARK_FLAGS:
        v = getattr(args, name)
        if v is not None:
            d[name] = v
    return MultiStageConfig.from_dict(d)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    defaults = PretrainConfig()
    kw = {}
    for name in ("seed", "arch", "data_seed", "hidden_size", "num_layers", "head_size", "steps", "batch_size", "lr",
                 "threads", "bptt"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if kw.get("threads") == 0:
        kw["threads"] = None
    if args.data_seed is None:
        kw["data_seed"] = kw.get("seed", defaults.seed)
    kw["benchmark"] = _benchmark_from_args(args)
    return PretrainConfig(**kw)


def _refuse_model_dir(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not args.overwrite:
        steps = sorted(p.name for p in out.glob("step*") if p.is_dir()) if out.is_dir() else []
        refuse_existing(out, [*MODEL_FILES, *steps], "a pretrained model", "--overwrite to replace it")


def run_pretrain(args: argparse.Namespace) -> int:
    """``prosg pretrain``: train, save, and (unless ``--eval 0``) report held-out compliance."""
    from prosg.method.cli import usage_errors

    with usage_errors():
        cfg = config_from_args(args)
    _refuse_model_dir(args)
    with locked(args.out):
        _refuse_model_dir(args)  # again, now that no other process can write one
        return _run_pretrain(args, cfg)


def _run_pretrain(args: argparse.Namespace, cfg: PretrainConfig) -> int:
    print(json.dumps(cfg.to_dict(), sort_keys=True), file=sys.stderr)
    history: list = []
    start = time.perf_counter()
    callback = None
    if args.save_every:
        def callback(step, model):
            if (step + 1) % args.save_every == 0 and step + 1 < cfg.steps:
                save_base_model(model, cfg, Path(args.out) / f"step{step + 1}",
                                extra={"steps_done": step + 1, "elapsed": round(time.perf_counter() - start, 1)})

    model = pretrain(cfg, progress=not args.quiet, history=history, callback=callback)
    seconds = time.perf_counter() - start
    tail = [loss for _, loss in history[-50:]]
    extra = {"train_seconds": round(seconds, 1), "final_loss": round(sum(tail) / len(tail), 4),
             "torch": torch.__version__}
    if args.eval:
        from prosg.method.evaluation import evaluate

        examples = generate_examples(cfg.benchmark, args.eval, seed=args.eval_seed)
        previous_threads = torch.get_num_threads()
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        try:
            result = evaluate(model, examples, progress=not args.quiet)
        finally:
            torch.set_num_threads(previous_threads)
        extra["eval"] = {"seed": args.eval_seed, "examples": args.eval, **result.summary()}
    out = save_base_model(model, cfg, args.out, extra=extra)
    print(json.dumps({"out": str(out), **extra}, indent=2))
    return 0


def add_pretrain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``prosg pretrain`` (its ``func`` is :func:`run_pretrain`)."""
    from prosg.method.cli import config_flags, add_replace_args, nonneg_int, positive_int

    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="train a tiny RWKV-4 or RWKV-7 base model of the forgetting benchmark",
                       description="Train a tiny RWKV-4 or RWKV-7 from scratch on the multi-stage benchmark "
                                   "(defaults: the bundled RWKV-4; each bundled base's train_config.json records "
                                   "the command that rebuilds it; see docs/base_model.md).")
    p.add_argument("--out", required=True, help="directory to write config.json, model.safetensors, train_config.json")
    add_replace_args(p)
    config_flags(p, PretrainConfig, ("seed", "arch", "hidden_size", "num_layers", "head_size", "steps", "batch_size",
                                     "lr", "bptt"))
    p.add_argument("--data-seed", type=nonneg_int, default=None,
                   help="benchmark seed of the training stream (default: --seed)")
    p.add_argument("--threads", type=nonneg_int, default=d.threads,
                   help="torch CPU threads (0: torch's setting; default: %(default)s, see PretrainConfig)")
    b = BASE_BENCHMARK
    p.add_argument("--setting", choices=tuple(SETTINGS), default=None,
                   help="named benchmark setting (docs/benchmark.md; default: standard); the flags below override "
                        "its fields")
    p.add_argument("--min-stages", type=positive_int, default=None, help=f"default {b.min_stages}")
    p.add_argument("--max-stages", type=positive_int, default=None, help=f"default {b.max_stages}")
    p.add_argument("--stage-length", type=positive_int, default=None, help=f"default {b.stage_length}")
    p.add_argument("--ramble-length", type=positive_int, default=None, help=f"default {b.ramble_length}")
    p.add_argument("--eval", type=nonneg_int, default=256, help="held-out examples scored after training (0: none)")
    p.add_argument("--eval-seed", type=int, default=1000, help="benchmark seed of the held-out examples")
    p.add_argument("--save-every", type=nonneg_int, default=0,
                   help="also save a checkpoint every N steps under OUT/stepN (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_pretrain)
    return p
