"""Command-line entry points of the method (``prosg pretrain|train|eval|demo``).

Errors (see :func:`prosg.__main__.main`): an option that is wrong on its own is
refused by argparse (usage, status 2); one wrong with the others, or an empty
selection, raises :class:`CLIError` (status 2) before anything is loaded or created;
what fails later (a missing file, an existing run, a diverged training) is reported
as one line with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path


class CLIError(SystemExit):
    """An error ``prosg`` reports as one line, exiting with ``status`` (2: usage, 1:
    runtime). A SystemExit whose ``str`` is the message, so that in-process callers see
    the message, not just the status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.code = status


@contextlib.contextmanager
def usage_errors():
    """The ValueErrors of building configs from options are usage errors."""
    try:
        yield
    except ValueError as e:
        raise CLIError(str(e), 2) from e


def _number(kind: type, low: float | None = None, *, above: bool = False):
    """An argparse ``type``: ``kind`` (int or a finite float), >= ``low`` (> with ``above``)."""
    what = "an integer" if kind is int else "a number"
    bound = "" if low is None else f" {'>' if above else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}{bound}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if above else value < low)):
            raise argparse.ArgumentTypeError(f"expected {'a finite number' if kind is float else what}{bound}, "
                                             f"got {text!r}")
        return value

    return parse


positive_int = _number(int, 1)
nonneg_int = _number(int, 0)
positive_float = _number(float, 0, above=True)
nonneg_float = _number(float, 0)
finite_float = _number(float)


def _load_base(path: str | None):
    """The frozen base model and the benchmark config it was trained on (None when
    unknown): a directory written by ``prosg pretrain`` (or any transformers-layout
    RWKV-4 checkpoint, or an fla-layout RWKV-7 one: ``model_type`` ``rwkv7`` in its
    config.json), or (None) the tiny base model bundled with prosg."""
    from prosg.models.loading import load_model

    try:
        from prosg.method.pretrain import TRAIN_CONFIG_FILE, load_base_model
    except ImportError:
        load_base_model, TRAIN_CONFIG_FILE = None, None
    from prosg.method.pretrain import bundled_name

    with usage_errors():
        bundled = bundled_name(path)
    if bundled is None and (load_base_model is None or not (Path(path) / TRAIN_CONFIG_FILE).is_file()):
        return load_model(path), None  # the class from config.json's model_type
    if load_base_model is None:
        raise CLIError("no --base given and the bundled base model is not available in this install", 1)
    return load_base_model(path)


def check_packages(command: str, required: tuple[str, ...] = ("safetensors", "tqdm"),
                   optional: dict[str, str] | None = None) -> None:
    """Before any work: CLIError (status 1) naming every missing required package, and
    a warning for each optional one (``{package: what is skipped without it}``), so a
    run never fails after its main work for want of a package."""
    import importlib

    def missing(name: str) -> bool:
        try:
            importlib.import_module(name)
        except ImportError:
            return True
        return False

    absent = [name for name in required if missing(name)]
    if absent:
        raise CLIError(f"{command} needs the package(s) {', '.join(absent)}: pip install {' '.join(absent)}", 1)
    for name, what in (optional or {}).items():
        if missing(name):
            logging.getLogger("prosg").warning("%s is not installed: %s (pip install %s)", name, what, name)


@contextlib.contextmanager
def console_logging():
    """INFO log lines on stderr that go through tqdm.write while a bar is shown, so bars
    and log lines never overwrite each other."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with logging_redirect_tqdm():
        yield


def base_for(generator: str | None, base: str | None) -> str | None:
    """``--base``, else the base path a generator directory records (when it still
    exists), else None (the bundled base)."""
    if base or not generator or not Path(generator).is_dir():
        return base
    from prosg.method.pretrained import read_config

    hint = (read_config(generator) or {}).get("base_path")
    if hint and hint.startswith("bundled"):
        return hint
    return hint if hint and Path(hint).is_dir() else None


def _base_path(base: str | None) -> str:
    """What a generator records of its base: an absolute directory or ``bundled:NAME``."""
    from prosg.method.pretrain import bundled_name

    name = bundled_name(base)
    return f"bundled:{name}" if name is not None else str(Path(base).resolve())


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=nonneg_int, default=1,
                   help="torch CPU threads (default 1: a tiny model's ops are too small to split, and on a "
                        "shared machine threads waiting on each other run several times slower; 0: leave torch's setting)")


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None and args.threads > 0:
        torch.set_num_threads(args.threads)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from prosg.data import SETTINGS

    g = p.add_argument_group("benchmark data (docs/benchmark.md)")
    g.add_argument("--setting", choices=tuple(SETTINGS), default=None,
                   help="a named benchmark setting (default: the one the base model or generator was trained on); "
                        "the flags below override its fields")
    g.add_argument("--min-stages", type=positive_int, default=None, help="fewest stages per prompt")
    g.add_argument("--max-stages", type=positive_int, default=None, help="most stages per prompt")
    g.add_argument("--stage-length", type=positive_int, default=None, help="tokens per instruction span")
    g.add_argument("--ramble-length", type=positive_int, default=None, help="tokens of a ramble span")
    g.add_argument("--num-letters", type=positive_int, default=None, help="letters drawn for patterns")
    g.add_argument("--tag-stages", action="store_true", default=None, help="the tagged variant")


def _data_fields(args: argparse.Namespace) -> dict:
    names = ("min_stages", "max_stages", "stage_length", "ramble_length", "num_letters", "tag_stages")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _benchmark(base: dict, args: argparse.Namespace):
    """The benchmark of ``base``'s fields with the flags' overrides (validated: a
    usage error when they do not fit together)."""
    from prosg.data import MultiStageConfig, setting

    with usage_errors():
        if getattr(args, "setting", None):
            base = setting(args.setting).to_dict()
        return MultiStageConfig.from_dict({**base, **_data_fields(args)})


def config_flags(group, config_cls, names: tuple[str, ...] | None = None, prefix: str = "") -> None:
    """One flag per field of the dataclass ``config_cls`` (or of those in ``names``):
    ``--<prefix>field-name`` with the field's default, its metadata's help and choices, a
    number type bounded by its metadata's "min", booleans as --x/--no-x, tuples of
    names as comma-separated lists; a None default takes a number. Defaults and help
    have this one source."""
    for f in dataclasses.fields(config_cls):
        if names is not None and f.name not in names:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = f.metadata
        # a None default is described by the field's own help ("default: tuned ..."), not as "None"
        suffix = "" if default is None else " (default: %(default)s)"
        kw: dict = {"default": default, "help": meta.get("help", "") + suffix}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kw["default"] = ",".join(default)
        elif isinstance(default, (int, float)):
            kw["type"] = _number(type(default), meta.get("min"), above=meta.get("above", False))
        elif default is None and "type" in meta:  # an optional number, checked like the others
            kw["type"] = _number(meta["type"], meta.get("min"), above=meta.get("above", False))
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        group.add_argument("--" + prefix + f.name.replace("_", "-"), dest=prefix.replace("-", "_") + f.name, **kw)


def config_flag_values(args: argparse.Namespace, config_cls, names: tuple[str, ...] | None = None,
                       prefix: str = "") -> dict:
    """The parsed values of :func:`config_flags`' flags, by field name (comma lists
    as tuples of distinct names)."""
    values = {}
    for f in dataclasses.fields(config_cls):
        dest = prefix.replace("-", "_") + f.name
        if (names is None or f.name in names) and hasattr(args, dest):
            value = getattr(args, dest)
            if isinstance(f.default, tuple):
                value = _names(value, "--" + prefix + f.name.replace("_", "-"))
            values[f.name] = value
    return values


def _add_training_args(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    from prosg.method.train import TrainConfig

    config_flags(p.add_argument_group("training"), TrainConfig, names or _TRAIN_FLAGS)


# TrainConfig's fields with a `prosg train` flag (data and generator have their own).
_TRAIN_FLAGS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
                "filler_loss", "span_start_weight", "span_start_tokens", "own_context", "seed", "data_seed", "max_length",
                "truncate", "chunk_length", "precision", "checkpointing")


#: The true-gradient fields with a flag (each row fixes its own ``steps``).
_TG_FLAGS = ("lr", "multi_steps", "rank", "targets")


def _add_true_gradient_args(p: argparse.ArgumentParser) -> None:
    from prosg.method.true_gradient import TrueGradientConfig

    config_flags(p.add_argument_group("true_gradient baseline"), TrueGradientConfig, _TG_FLAGS, prefix="tg-")


def _true_gradient_config(args: argparse.Namespace):
    from prosg.method.true_gradient import TrueGradientConfig

    with usage_errors():
        return TrueGradientConfig(**config_flag_values(args, TrueGradientConfig, _TG_FLAGS, prefix="tg-"))


def _add_generator_args(p: argparse.ArgumentParser) -> None:
    from prosg.method.generator import GeneratorConfig

    config_flags(p.add_argument_group("generator (docs/method.md)"), GeneratorConfig)


def _generator_fields(args: argparse.Namespace) -> dict:
    """The generator's config fields, validated (before anything is loaded)."""
    from prosg.method.generator import GeneratorConfig

    fields = config_flag_values(args, GeneratorConfig)
    with usage_errors():
        GeneratorConfig.from_dict(fields)
    return fields


def _names(text: str, option: str) -> tuple[str, ...]:
    """A comma-separated list of one or more distinct names."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise CLIError(f"{option} must name at least one entry, got {text!r}")
    if len(set(names)) != len(names):
        raise CLIError(f"{option} names one more than once: {text!r}")
    return names


def _methods(text: str) -> tuple[str, ...]:
    from prosg.method.demo import METHODS

    methods = _names(text, "--methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def _seeds(text: str, option: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"{option}: seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CLIError(f"{option}: seeds must be one or more distinct integers, got {text!r}")
    return seeds


def _refuse_report(out: Path, args: argparse.Namespace) -> None:
    from prosg.method.demo import REPORT_FILES
    from prosg.method.outputs import refuse_existing

    if not args.overwrite:
        refuse_existing(out, REPORT_FILES, "a report", "--overwrite to replace it")


def _train(args: argparse.Namespace) -> int:
    from prosg.method.train import TrainConfig, refuse_run_dir, train

    generator = _generator_fields(args)
    if args.data and _data_fields(args):
        raise CLIError(f"train: --data trains on your pairs; the benchmark options "
                       f"{sorted('--' + k.replace('_', '-') for k in _data_fields(args))} do not apply")
    if args.data and not args.tokenizer:
        raise CLIError("train: --data needs --tokenizer (a tokenizer.json file, benchmark or rwkv-world)")
    if args.tokenizer and not args.data:
        raise CLIError("train: --tokenizer is for --data (the benchmark has its own vocabulary)")
    refuse_run_dir(args.out, args.resume, args.overwrite)
    check_packages("train")
    _set_threads(args)
    pairs = tokenizer = None
    flags = config_flag_values(args, TrainConfig, _TRAIN_FLAGS)
    if args.data:
        from prosg.data.text import load_text_tokenizer
        from prosg.method.train import file_sha256, load_user_data

        tokenizer = load_text_tokenizer(args.tokenizer)
        data_file = str(Path(args.data).resolve())
        if not Path(data_file).is_file():
            raise FileNotFoundError(f"--data {args.data}: no such file")
        with usage_errors():
            config = TrainConfig(**flags, generator=generator, data_file=data_file, data_sha256=file_sha256(data_file),
                                 tokenizer=args.tokenizer, tokenizer_spec=tokenizer.spec())
        pairs, tokenizer = load_user_data(config, tokenizer)  # every line checked before the base is loaded
    with console_logging():
        model, benchmark = _load_base(args.base)
        if not args.data:
            # The base model's own benchmark is the default task; flags override its fields.
            data = {**(benchmark.to_dict() if benchmark is not None else {}), **_data_fields(args)}
            _benchmark(data, args)
            with usage_errors():
                config = TrainConfig(**flags, data=data, generator=generator)
        result = train(model, config, args.out, resume=args.resume, overwrite=args.overwrite,
                       device=args.device or None, save_every=args.save_every, log_every=args.log_every,
                       progress=not args.no_progress, pairs=pairs, tokenizer=tokenizer,
                       base_path=_base_path(args.base))
    hist = result["history"]
    if hist:
        print(f"trained {result['final_step']} steps: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} "
              f"(base model on the last batch: {hist[-1]['base_loss']:.4f}); generator in {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.data:
        return _eval_data(args)
    if args.verifier or args.tokenizer:
        raise CLIError("eval: --verifier and --tokenizer are for --data (the benchmark has its own verifiers)")
    methods = _methods(args.methods)
    seeds = _seeds(args.seeds, "--seeds")
    if "prosg" in methods and not args.generator:
        raise CLIError("eval: method 'prosg' needs --generator (or drop it from --methods)")
    from prosg.method.pretrained import weights_path

    weights = weights_path(args.generator) if args.generator else None
    out = Path(args.out)
    _refuse_report(out, args)
    check_packages("eval", optional={"matplotlib": "forgetting.png will not be drawn"})
    _set_threads(args)
    from prosg.method.demo import run_seeds, write_report
    from prosg.method.outputs import locked
    from prosg.method.train import generator_from_checkpoint, read_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = base_for(args.generator, args.base)
    model, benchmark = _load_base(base)
    model = model.to(args.device or "cpu")
    generator = None
    data = benchmark.to_dict() if benchmark is not None else {}
    if args.generator:
        tensors, meta = read_checkpoint(weights)
        generator = generator_from_checkpoint(tensors, meta, model, weights)
        # evaluate on the task the generator was trained on (flags override it)
        trained = json.loads(meta["train_config"]) if "train_config" in meta else {}
        if trained.get("data_file"):
            raise CLIError(f"eval: {args.generator} was trained on --data {trained['data_file']}; evaluate it with "
                           "--data (the benchmark is another task)")
        data = trained.get("data") or data
    bench = _benchmark(data, args)
    n = args.n if args.n is not None else 200
    with locked(out), console_logging():
        _refuse_report(out, args)  # again, now that no other process can write one
        info = {"base_model": _base_path(base), "generator": args.generator,
                "examples_per_seed": n, "test_seeds": seeds, "benchmark": bench.to_dict(),
                "forced_rambles": args.forced_rambles}
        results, per_seed = run_seeds(model, bench, seeds, n, generator, methods, batch_size=args.batch_size,
                                      progress=not args.no_progress, true_gradient=_true_gradient_config(args),
                                      info=info, forced_free_form=args.forced_rambles)
        write_report(out, results, info, per_seed)
    print((out / "report.md").read_text())
    return 0


#: The full demo's training steps where they differ from 2000: an RWKV-7 step costs
#: about twice an RWKV-4 step here, and docs/results.md's RWKV-7 generators were trained
#: for 1500 (their gain was no smaller than after 2000: +4.3 vs +3.0 points).
DEMO_STEPS = {"rwkv7": 1500}


def _demo(args: argparse.Namespace) -> int:
    if args.arch is not None:
        if args.base is not None:
            raise CLIError("demo: give --arch (a bundled base) or --base, not both")
        args.base = f"bundled:{args.arch}"
    seeds = _seeds(args.test_seeds, "--test-seeds")
    if 0 in seeds:
        raise CLIError("demo: --test-seeds must not include 0, the training seed")
    methods = _methods(args.methods or ("baseline,repeat_prompt,prosg" if args.quick
                                         else "baseline,repeat_prompt,prosg,true_gradient"))
    tg = _true_gradient_config(args)
    generator = _generator_fields(args)
    out = Path(args.out)
    _refuse_report(out, args)
    from prosg.method.train import refuse_run_dir

    refuse_run_dir(out / "generator", args.resume, args.overwrite)
    check_packages("demo", optional={"matplotlib": "forgetting.png will not be drawn"})
    _set_threads(args)
    import time

    from prosg.method.demo import run_seeds, write_report
    from prosg.method.outputs import locked
    from prosg.method.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    model, benchmark = _load_base(args.base)
    # the base model's own task (flags override its fields)
    benchmark = _benchmark(benchmark.to_dict() if benchmark is not None else {}, args)
    steps = args.steps if args.steps is not None else (300 if args.quick else DEMO_STEPS.get(args.arch, 2000))
    n = args.n if args.n is not None else (64 if args.quick else 200)
    with usage_errors():
        config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(20, steps // 5),
                             seed=args.seed, data_seed=0, data=benchmark.to_dict(), generator=generator,
                             filler_loss=args.filler_loss)
    with locked(out), console_logging():
        _refuse_report(out, args)
        result = train(model, config, out / "generator", resume=args.resume, overwrite=args.overwrite,
                       device=args.device, save_every=max(steps // 4, 1), log_every=max(steps // 20, 1),
                       progress=not args.no_progress,
                       base_path=_base_path(args.base))
        train_s = time.perf_counter() - t0
        hist = result["history"]
        info = {"base_model": _base_path(args.base), "generator": str(out / "generator"),
                "examples_per_seed": n, "test_seeds": seeds, "benchmark": benchmark.to_dict(),
                "train": {"steps": steps, "config": json.loads(config.to_json()), "seconds": round(train_s, 1),
                          "first": hist[0] if hist else None, "last": hist[-1] if hist else None}}
        results, per_seed = run_seeds(model, benchmark, seeds, n, result["generator"], methods, batch_size=32,
                                      progress=not args.no_progress, true_gradient=tg, info=info)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        write_report(out, results, info, per_seed)
    print((out / "report.md").read_text())
    return 0



DATA_REPORT_FILES = ("report.json", "report.md")


def _tokenizer_for(generator, name: str | None):
    """``--tokenizer``, else the one the generator was trained with."""
    from prosg.data.text import load_text_tokenizer

    if name:
        return load_text_tokenizer(name)
    if generator is not None and generator.tokenizer is not None:
        return generator.tokenizer
    raise CLIError("the generator records no tokenizer (an older prosg run): pass --tokenizer", 2)


def _eval_data(args: argparse.Namespace) -> int:
    """``prosg eval --data``: response-token loss by position, base vs ProSG."""
    from prosg.method.outputs import atomic_write_text, locked, refuse_existing

    out = Path(args.out)
    if not args.overwrite:
        refuse_existing(out, DATA_REPORT_FILES, "a report", "--overwrite to replace it")
    if not args.generator and not args.tokenizer:
        raise CLIError("eval --data: pass --generator (and its tokenizer is used) or --tokenizer for the base alone")
    from prosg.method.user_eval import evaluate_pairs, format_markdown, load_verifier

    verifier = None
    if args.verifier:
        with usage_errors():
            verifier = load_verifier(args.verifier)
    check_packages("eval")
    _set_threads(args)
    from prosg.data.text import load_text_pairs
    from prosg.method.pretrained import load_pretrained
    from prosg.pipeline import load_base

    base = base_for(args.generator, args.base)
    with console_logging():
        model = load_base(base, device=args.device or "cpu")
        generator = load_pretrained(args.generator, model)[0] if args.generator else None
        tokenizer = _tokenizer_for(generator, args.tokenizer)
        pairs = load_text_pairs(args.data, tokenizer, max_length=args.max_length)
        if args.n:
            pairs = pairs[: args.n]
        with locked(out):
            if not args.overwrite:
                refuse_existing(out, DATA_REPORT_FILES, "a report", "--overwrite to replace it")
            report = evaluate_pairs(model, generator, pairs, tokenizer, batch_size=args.batch_size,
                                    verifier=verifier, max_new_tokens=args.max_new_tokens,
                                    progress=not args.no_progress)
            info = {"data": str(args.data), "base_model": base or "bundled", "generator": args.generator,
                    "verifier": args.verifier}
            report = {**info, **report}
            atomic_write_text(out / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
            atomic_write_text(out / "report.md", format_markdown(report, info))
    print((out / "report.md").read_text())
    return 0


DEFAULT_GENERATOR = "prosg_demo/generator"


def _generate(args: argparse.Namespace) -> int:
    import sys

    if (args.prompt is None) == (args.prompts is None):
        raise CLIError("generate: give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    gen_dir = Path(args.generator)
    if not gen_dir.exists():
        hint = " (what `prosg demo --quick` writes: run it first)" if args.generator == DEFAULT_GENERATOR else ""
        raise FileNotFoundError(f"--generator {args.generator}: no such generator directory{hint}")
    sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k)) or args.sample
    options = dict(do_sample=sampling, temperature=args.temperature if args.temperature is not None else 1.0,
                   top_p=args.top_p if args.top_p is not None else 1.0,
                   top_k=args.top_k if args.top_k is not None else 0, seed=args.seed)
    check_packages("generate")
    _set_threads(args)
    from prosg.pipeline import ProSG

    pipe = ProSG.from_pretrained(args.generator, base=base_for(args.generator, args.base), tokenizer=args.tokenizer,
                                 device=args.device or "cpu")
    n = args.max_new_tokens
    if args.prompt is not None:
        with usage_errors():
            pipe.encode([args.prompt])
        runs = [("prosg", True)] + ([("base", False)] if args.compare else [])
        for label, steer in runs:
            if args.compare:
                print(f"=== {label} ===", flush=True)
            for piece in pipe.stream(args.prompt, n, steer=steer, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return 0
    from prosg.data.text import load_text_pairs

    pairs = load_text_pairs(args.prompts, pipe.tokenizer, require_response=False)
    for start in range(0, len(pairs), args.batch_size):
        rows = pairs[start:start + args.batch_size]
        prompts = [p.meta["prompt"] for p in rows]
        steered = pipe.generate(prompts, n, **options)
        base = pipe.generate(prompts, n, steer=False, **options) if args.compare else None
        for i, (pair, text) in enumerate(zip(rows, steered)):
            record = {"line": pair.meta["line"], "prompt": pair.meta["prompt"], "prosg": text}
            if base is not None:
                record["base"] = base[i]
            print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    from prosg.method.outputs import locked, refuse_existing

    out = Path(args.out)
    from prosg.method.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora

    if not args.overwrite:
        refuse_existing(out, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), "an adapter", "--overwrite to replace it")
    check_packages("export-lora", required=("safetensors", "peft"))
    _set_threads(args)
    from prosg.pipeline import ProSG

    base = base_for(args.generator, args.base)
    pipe = ProSG.from_pretrained(args.generator, base=base, tokenizer=args.tokenizer)
    with usage_errors():
        delta = pipe.delta([args.prompt])
    with locked(out):
        export_lora(delta, pipe.model, out, base_path=str(Path(base).resolve()) if base else None)
    print(f"wrote {out / ADAPTER_CONFIG} and {out / ADAPTER_WEIGHTS}: rank {pipe.generator.config.rank}, "
          f"{len(delta.factors)} matrices, scale {delta.scale:g} (lora_alpha / r)")
    return 0


def add_replace_args(p: argparse.ArgumentParser, resume_help: str | None = None) -> None:
    """``--overwrite`` (and, with ``resume_help``, ``--resume``, which excludes it)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace what an earlier run left in OUT (default: refuse)")
    if resume_help:
        g.add_argument("--resume", action="store_true", help=resume_help)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the method's subcommands to ``prosg``'s parser."""

    p = sub.add_parser("train", help="train the synthetic-gradient generator on a frozen base model",
                       description="Trains the ProSG generator (docs/method.md) with the LM loss on benchmark "
                                   "responses under the generated delta. Single process, or torchrun for "
                                   "several GPUs (DistributedDataParallel).")
    p.add_argument("--base", default=None, help="base model directory (transformers or fla layout) or bundled:NAME (rwkv4, rwkv7, rwkv4_tbptt); default: the bundled control, bundled:rwkv4_tbptt")
    p.add_argument("--out", required=True, help="output directory (checkpoint, generator, log)")
    add_replace_args(p, "continue from OUT/checkpoint.safetensors if present")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")
    _add_training_args(p)
    _add_generator_args(p)
    p.add_argument("--data", default=None, help="train on your (prompt, response) pairs: a JSONL file of "
                   "{\"prompt\": str, \"response\": str} lines, instead of the benchmark")
    p.add_argument("--tokenizer", default=None, help="with --data: a tokenizers file (tokenizer.json, RWKV-4 "
                   "Pile models), rwkv-world (RWKV World models) or benchmark")
    p.add_argument("--save-every", type=positive_int, default=100)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_threads_arg(p)
    _add_data_args(p)
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="compliance of baseline / repeat_prompt / prosg on held-out prompts",
                       description="Greedy responses on held-out benchmark prompts, scored per stage; writes "
                                   "OUT/report.json (methods.<name>.by_stage, .overall), report.md, forgetting.png.")
    e.add_argument("--base", default=None, help="base model directory or bundled:NAME; default: the one the generator records, else the bundled one")
    e.add_argument("--generator", default=None, help="a trained generator (OUT/generator.safetensors of prosg train)")
    e.add_argument("--out", required=True, help="report directory")
    add_replace_args(e)
    e.add_argument("--data", default=None, help="evaluate on your (prompt, response) JSONL instead of the "
                   "benchmark: response-token loss by position, base vs prosg")
    e.add_argument("--tokenizer", default=None, help="with --data: the tokenizer (default: the generator's)")
    e.add_argument("--verifier", default=None, help="with --data: module:function scoring greedy responses, "
                   "called as f(prompt=, response=, reference=, record=) -> bool or number")
    e.add_argument("--max-length", type=nonneg_int, default=0, help="with --data: refuse longer examples (0: none)")
    e.add_argument("--max-new-tokens", type=nonneg_int, default=0,
                   help="with --verifier: tokens generated per response (0: the reference's length + 8)")
    e.add_argument("--methods", default="baseline,repeat_prompt,prosg",
                   help="comma-separated, of baseline, repeat_prompt, prosg, true_gradient, true_gradient_multi "
                        "(default: %(default)s)")
    _add_true_gradient_args(e)
    e.add_argument("--forced-rambles", action="store_true",
                   help="read each reference ramble instead of generating it, so the stages after it start the "
                        "ramble's full length later (with --ramble-length: past the training lengths)")
    e.add_argument("--n", type=positive_int, default=None,
                   help="held-out examples per seed (default 200; with --data: the first n lines, default all)")
    e.add_argument("--seeds", default="1,2,3",
                   help="benchmark seeds of the held-out examples, n each; the report gives the mean and spread "
                        "over them (default: %(default)s; prosg train uses seed 0)")
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument("--device", default=None)
    e.add_argument("--no-progress", action="store_true")
    _add_threads_arg(e)
    _add_data_args(e)
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="the whole method on a bundled base model: train, evaluate, report",
                       description="Trains the generator on a bundled base model, evaluates baseline, "
                                   "repeat_prompt, prosg and true_gradient on held-out prompts and writes "
                                   "OUT/report.json, report.md and forgetting.png (about 6 minutes on one CPU thread "
                                   "on the default base; --quick: about a minute).")
    d.add_argument("--out", default="prosg_demo", help="output directory (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="300 steps and 3 x 64 held-out prompts (about a minute on one thread)")
    d.add_argument("--arch", choices=("rwkv4", "rwkv7"), default=None,
                   help="run on the naturally forgetting bundled base of this architecture (bundled:rwkv4, "
                        "bundled:rwkv7); default: the induced-forgetting control bundled:rwkv4_tbptt, the one base "
                        "with an established ProSG gain (docs/results.md)")
    d.add_argument("--base", default=None, help="base model directory or bundled:NAME; default: the bundled one")
    d.add_argument("--steps", type=positive_int, default=None,
                   help="training steps (default 2000, with --arch rwkv7 1500; --quick 300)")
    d.add_argument("--n", type=positive_int, default=None, help="held-out examples per seed (default 200; --quick 64)")
    _add_training_args(d, ("batch_size", "lr", "filler_loss", "seed"))
    _add_generator_args(d)
    d.add_argument("--methods", default=None,
                   help="comma-separated, of baseline, repeat_prompt, prosg, true_gradient, true_gradient_multi "
                        "(default: baseline,repeat_prompt,prosg,true_gradient; --quick: without true_gradient)")
    _add_true_gradient_args(d)
    d.add_argument("--test-seeds", default="1,2,3",
                   help="benchmark seeds of the held-out prompts, n each (default: %(default)s; training uses seed 0)")
    d.add_argument("--device", default=None)
    add_replace_args(d, "continue an interrupted demo's training")
    d.add_argument("--no-progress", action="store_true")
    _add_threads_arg(d)
    _add_data_args(d)
    d.set_defaults(func=_demo)

    gp = sub.add_parser("generate", help="generate with a trained generator's delta (streamed)",
                        description="Encodes the prompt with the generator's tokenizer, computes its delta once and "
                                    "streams the steered continuation; --compare prints the base model's beside it.")
    gp.add_argument("--generator", default=DEFAULT_GENERATOR,
                    help="a generator directory (prosg train --out, prosg demo's OUT/generator; default: %(default)s)")
    gp.add_argument("--base", default=None, help="base model directory (default: the one the generator records, "
                    "else the bundled one)")
    gp.add_argument("--prompt", default=None, help="one prompt")
    gp.add_argument("--prompts", default=None, help="a JSONL file of {\"prompt\": str} lines; one JSON line out each")
    gp.add_argument("--tokenizer", default=None, help="override the generator's tokenizer")
    gp.add_argument("--max-new-tokens", type=positive_int, default=64)
    gp.add_argument("--sample", action="store_true", help="sample (also implied by --temperature/--top-p/--top-k)")
    gp.add_argument("--temperature", type=positive_float, default=None)
    gp.add_argument("--top-p", type=positive_float, default=None)
    gp.add_argument("--top-k", type=nonneg_int, default=None)
    gp.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    gp.add_argument("--compare", action="store_true", help="also print the base model's output (no delta)")
    gp.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together (--prompts)")
    gp.add_argument("--device", default=None)
    _add_threads_arg(gp)
    gp.set_defaults(func=_generate)

    x = sub.add_parser("export-lora", help="one prompt's delta as a PEFT LoRA adapter",
                       description="Writes OUT/adapter_config.json and adapter_model.safetensors: the delta of "
                                   "--prompt on transformers' RwkvForCausalLM (lora_alpha / r = the delta's scale).")
    x.add_argument("--generator", required=True, help="a generator directory")
    x.add_argument("--base", default=None, help="base model directory (default: the one the generator records)")
    x.add_argument("--prompt", required=True)
    x.add_argument("--tokenizer", default=None, help="override the generator's tokenizer")
    x.add_argument("--out", required=True, help="adapter directory")
    add_replace_args(x)
    _add_threads_arg(x)
    x.set_defaults(func=_export_lora)

    from prosg.method.pretrain import add_pretrain_parser

    add_pretrain_parser(sub)
