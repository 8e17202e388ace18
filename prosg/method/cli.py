"""Command-line entry points of the method (``prosg pretrain|train|eval|demo``)."""

from __future__ import annotations

import argparse
import logging


def _load_base(path: str | None):
    """The frozen base model and the benchmark config it was trained on (None when
    unknown): a directory written by ``prosg pretrain`` (or any transformers-layout
    RWKV-4 checkpoint), or (None) the tiny base model bundled with prosg."""
    from pathlib import Path

    from prosg.models import RWKV4LM

    try:
        from prosg.method.pretrain import TRAIN_CONFIG_FILE, load_base_model
    except ImportError:
        load_base_model, TRAIN_CONFIG_FILE = None, None
    if path and (load_base_model is None or not (Path(path) / TRAIN_CONFIG_FILE).is_file()):
        return RWKV4LM.from_pretrained(path), None
    if load_base_model is None:
        raise SystemExit("prosg: no --base given and the bundled base model is not available in this install")
    return load_base_model(path)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark data (docs/benchmark.md)")
    g.add_argument("--min-stages", type=int, default=None, help="fewest stages per prompt")
    g.add_argument("--max-stages", type=int, default=None, help="most stages per prompt")
    g.add_argument("--stage-length", type=int, default=None, help="tokens per instruction span")
    g.add_argument("--ramble-length", type=int, default=None, help="tokens of a ramble span")
    g.add_argument("--num-letters", type=int, default=None, help="letters drawn for patterns")
    g.add_argument("--tag-stages", action="store_true", default=None, help="the tagged variant")


def _data_fields(args: argparse.Namespace) -> dict:
    names = ("min_stages", "max_stages", "stage_length", "ramble_length", "num_letters", "tag_stages")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _train(args: argparse.Namespace) -> int:
    from prosg.method.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    generator = {"targets": tuple(t.strip() for t in args.targets.split(",") if t.strip()), "rank": args.rank,
                 "scale": args.scale, "hidden_size": args.hidden_size, "input_mode": args.input_mode}
    model, benchmark = _load_base(args.base)
    # The base model's own benchmark is the default task; flags override its fields.
    data = {**(benchmark.to_dict() if benchmark is not None else {}), **_data_fields(args)}
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, seed=args.seed,
                         data_seed=args.data_seed, data=data, generator=generator)
    device = args.device or None
    result = train(model, config, args.out, resume=args.resume, device=device, save_every=args.save_every,
                   log_every=args.log_every, progress=not args.no_progress)
    hist = result["history"]
    if hist:
        print(f"trained {result['final_step']} steps: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} "
              f"(base model on the last batch: {hist[-1]['base_loss']:.4f}); generator in {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the method's subcommands to ``prosg``'s parser."""
    from prosg.method.generator import DEFAULT_TARGETS

    p = sub.add_parser("train", help="train the synthetic-gradient generator on a frozen base model",
                       description="Trains the ProSG generator (docs/method.md) with the LM loss on benchmark "
                                   "responses under the generated delta. Single process, or torchrun for "
                                   "several GPUs (DistributedDataParallel).")
    p.add_argument("--base", default=None, help="base model directory (transformers layout); default: the bundled one")
    p.add_argument("--out", required=True, help="output directory (checkpoint, generator, log)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if present")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="generator initialisation")
    p.add_argument("--data-seed", type=int, default=0, help="benchmark seed of the training examples")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module names or patterns (default: %(default)s)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--hidden-size", type=int, default=64, help="generator width")
    p.add_argument("--input-mode", choices=("true", "learned"), default="true")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_data_args(p)
    p.set_defaults(func=_train)

    from prosg.method.pretrain import add_pretrain_parser

    add_pretrain_parser(sub)
