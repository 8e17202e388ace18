"""Command-line entry points of the method (``prosg pretrain|train|eval|demo``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


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


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a tiny model's ops are too small to split, and on a "
                        "shared machine threads waiting on each other run several times slower; 0: leave torch's setting)")


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None and args.threads > 0:
        torch.set_num_threads(args.threads)


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


def _add_generator_args(p: argparse.ArgumentParser) -> None:
    from prosg.method.generator import GeneratorConfig

    d = GeneratorConfig()
    g = p.add_argument_group("generator (docs/method.md)")
    g.add_argument("--targets", default=",".join(d.targets),
                   help="comma-separated module names or patterns (default: %(default)s)")
    g.add_argument("--rank", type=int, default=d.rank, help="rank r of every delta (default: %(default)s)")
    g.add_argument("--scale", type=float, default=d.scale)
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="generator width (default: %(default)s)")
    g.add_argument("--input-mode", choices=("shared", "true", "learned"), default=d.input_mode,
                   help="where V comes from (default: %(default)s)")
    g.add_argument("--features", choices=("all", "layer"), default=d.features,
                   help="what the heads read (default: %(default)s)")
    g.add_argument("--depth", type=int, default=d.depth, help="trunk layers (default: %(default)s)")
    g.add_argument("--encoder-layers", type=int, default=d.encoder_layers,
                   help="bidirectional encoder layers over the prompt (default: %(default)s)")
    g.add_argument("--copy-tokens", action=argparse.BooleanOptionalAction, default=d.copy_tokens,
                   help="the head-row term of residual-stream targets (default: %(default)s)")
    g.add_argument("--filler-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="take the loss on ramble filler words too (default: %(default)s; without it the "
                        "delta is free to disturb the ramble, see docs/results.md)")


def _generator_fields(args: argparse.Namespace) -> dict:
    return {"targets": tuple(t.strip() for t in args.targets.split(",") if t.strip()), "rank": args.rank,
            "scale": args.scale, "hidden_size": args.hidden_size, "input_mode": args.input_mode,
            "features": args.features, "depth": args.depth, "encoder_layers": args.encoder_layers,
            "copy_tokens": args.copy_tokens}


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"prosg: seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"prosg: seeds must be one or more distinct integers, got {text!r}")
    return seeds


def _train(args: argparse.Namespace) -> int:
    _set_threads(args)
    from prosg.method.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    generator = _generator_fields(args)
    model, benchmark = _load_base(args.base)
    # The base model's own benchmark is the default task; flags override its fields.
    data = {**(benchmark.to_dict() if benchmark is not None else {}), **_data_fields(args)}
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, seed=args.seed,
                         data_seed=args.data_seed, data=data, generator=generator, filler_loss=args.filler_loss)
    device = args.device or None
    result = train(model, config, args.out, resume=args.resume, device=device, save_every=args.save_every,
                   log_every=args.log_every, progress=not args.no_progress)
    hist = result["history"]
    if hist:
        print(f"trained {result['final_step']} steps: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} "
              f"(base model on the last batch: {hist[-1]['base_loss']:.4f}); generator in {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _set_threads(args)
    from prosg.method.demo import run_seeds, write_report
    from prosg.method.train import load_generator, read_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, benchmark = _load_base(args.base)
    model = model.to(args.device or "cpu")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    generator = None
    data = benchmark.to_dict() if benchmark is not None else {}
    if args.generator:
        generator = load_generator(args.generator, model)
        # evaluate on the task the generator was trained on (flags override it)
        data = json.loads(read_checkpoint(args.generator)[1]["train_config"])["data"] or data
    elif "prosg" in methods:
        raise SystemExit("prosg eval: method 'prosg' needs --generator (or drop it from --methods)")
    from prosg.data import MultiStageConfig

    bench = MultiStageConfig.from_dict({**data, **_data_fields(args)})
    seeds = _seeds(args.seeds)
    results, per_seed = run_seeds(model, bench, seeds, args.n, generator, methods, batch_size=args.batch_size,
                                  progress=not args.no_progress)
    write_report(args.out, results, {"base_model": args.base or "bundled", "generator": args.generator,
                                     "examples_per_seed": args.n, "test_seeds": seeds, "benchmark": bench.to_dict()},
                 per_seed)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    _set_threads(args)
    import time

    from prosg.method.demo import run_seeds, write_report
    from prosg.method.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    model, benchmark = _load_base(args.base)
    from prosg.data import MultiStageConfig

    # the base model's own task (flags override its fields)
    benchmark = MultiStageConfig.from_dict({**(benchmark.to_dict() if benchmark is not None else {}),
                                            **_data_fields(args)})
    steps = args.steps if args.steps is not None else (300 if args.quick else 2000)
    n = args.n if args.n is not None else (64 if args.quick else 200)
    seeds = _seeds(args.test_seeds)
    if 0 in seeds:
        raise SystemExit("prosg demo: --test-seeds must not include 0, the training seed")
    config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(20, steps // 5),
                         seed=args.seed, data_seed=0, data=benchmark.to_dict(), generator=_generator_fields(args),
                         filler_loss=args.filler_loss)
    out = Path(args.out)
    result = train(model, config, out / "generator", resume=args.resume, device=args.device,
                   save_every=max(steps // 4, 1), log_every=max(steps // 20, 1), progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    results, per_seed = run_seeds(model, benchmark, seeds, n, result["generator"], batch_size=32,
                                  progress=not args.no_progress)
    hist = result["history"]
    info = {"base_model": args.base or "bundled", "generator": str(out / "generator" / "generator.safetensors"),
            "examples_per_seed": n, "test_seeds": seeds, "benchmark": benchmark.to_dict(),
            "train": {"steps": steps, "config": json.loads(config.to_json()), "seconds": round(train_s, 1),
                      "first": hist[0] if hist else None, "last": hist[-1] if hist else None},
            "seconds": round(time.perf_counter() - t0, 1)}
    write_report(out, results, info, per_seed)
    print((out / "report.md").read_text())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the method's subcommands to ``prosg``'s parser."""

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
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="generator initialisation")
    p.add_argument("--data-seed", type=int, default=0, help="benchmark seed of the training examples")
    _add_generator_args(p)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_threads_arg(p)
    _add_data_args(p)
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="compliance of baseline / repeat_prompt / prosg on held-out prompts",
                       description="Greedy responses on held-out benchmark prompts, scored per stage; writes "
                                   "OUT/report.json (methods.<name>.by_stage, .overall), report.md, forgetting.png.")
    e.add_argument("--base", default=None, help="base model directory; default: the bundled one")
    e.add_argument("--generator", default=None, help="a trained generator (OUT/generator.safetensors of prosg train)")
    e.add_argument("--out", required=True, help="report directory")
    e.add_argument("--methods", default="baseline,repeat_prompt,prosg")
    e.add_argument("--n", type=int, default=200, help="held-out examples per seed")
    e.add_argument("--seeds", default="1,2,3",
                   help="benchmark seeds of the held-out examples, n each; the report gives the mean and spread "
                        "over them (default: %(default)s; prosg train uses seed 0)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default=None)
    e.add_argument("--no-progress", action="store_true")
    _add_threads_arg(e)
    _add_data_args(e)
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="the whole method on the bundled base model: train, evaluate, report",
                       description="Trains the generator on the bundled base model, evaluates baseline, "
                                   "repeat_prompt and prosg on held-out prompts and writes OUT/report.json, "
                                   "report.md and forgetting.png (about 5 minutes on one CPU thread; --quick: about a minute).")
    d.add_argument("--out", default="prosg_demo", help="output directory (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="300 steps and 3 x 64 held-out prompts (about a minute on one thread)")
    d.add_argument("--base", default=None, help="base model directory; default: the bundled one")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 2000; --quick 300)")
    d.add_argument("--n", type=int, default=None, help="held-out examples per seed (default 200; --quick 64)")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--lr", type=float, default=1e-2)
    _add_generator_args(d)
    d.add_argument("--seed", type=int, default=0, help="generator initialisation")
    d.add_argument("--test-seeds", default="1,2,3",
                   help="benchmark seeds of the held-out prompts, n each (default: %(default)s; training uses seed 0)")
    d.add_argument("--device", default=None)
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo's training")
    d.add_argument("--no-progress", action="store_true")
    _add_threads_arg(d)
    _add_data_args(d)
    d.set_defaults(func=_demo)

    from prosg.method.pretrain import add_pretrain_parser

    add_pretrain_parser(sub)
