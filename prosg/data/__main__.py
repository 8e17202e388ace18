"""``python -m prosg.data``: generate the multi-stage benchmark, score predictions.

    python -m prosg.data generate --seed 0 --n 2000 --out train.jsonl
    python -m prosg.data score --data test.jsonl --predictions preds.jsonl

``generate`` prints the config and the file's sha256 (as JSON) so a dataset can be
checked after regeneration; ``score`` prints :func:`prosg.data.multistage.summarize`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import fields

from prosg.data.jsonl import JSONLError, read_jsonl
from prosg.data.multistage import MultiStageConfig, generate_examples, load_examples, save_examples, summarize


def _config_from_args(args: argparse.Namespace) -> MultiStageConfig:
    kw = {}
    for f in fields(MultiStageConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    if args.ramble_length == 0:  # 0 on the command line: same as stage_length
        kw["ramble_length"] = None
    return MultiStageConfig(**kw)


def _generate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    examples = generate_examples(config, args.n, args.seed, start=args.start)
    save_examples(args.out, examples)
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    info = {"out": str(args.out), "seed": args.seed, "start": args.start, "n": args.n, "sha256": digest, "config": config.to_dict()}
    print(json.dumps(info, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    examples = load_examples(args.data)
    if args.predictions is None:
        responses = {e.id: e.response for e in examples}  # the references: a sanity check (all exact)
    else:
        responses = {}
        for lineno, d in read_jsonl(args.predictions):
            if not isinstance(d.get("id"), str) or not isinstance(d.get(args.key), str):
                raise JSONLError(args.predictions, lineno, f"expected string fields 'id' and {args.key!r}")
            responses[d["id"]] = d[args.key]
    missing = [e.id for e in examples if e.id not in responses]
    if missing:
        print(f"error: no prediction for {len(missing)} example(s), e.g. {missing[:3]}", file=sys.stderr)
        return 2
    print(json.dumps(summarize(e.verify(responses[e.id]) for e in examples), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prosg.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write examples of the multi-stage benchmark as JSONL")
    gen.add_argument("--seed", type=int, required=True)
    gen.add_argument("--n", type=int, required=True, help="number of examples")
    gen.add_argument("--start", type=int, default=0, help="index of the first example (default 0)")
    gen.add_argument("--out", required=True, help="output .jsonl (replaced atomically)")
    gen.add_argument("--min-stages", type=int)
    gen.add_argument("--max-stages", type=int)
    gen.add_argument("--stage-length", type=int)
    gen.add_argument("--ramble-length", type=int, help="0: same as --stage-length")
    gen.add_argument("--ops", nargs="+")
    gen.add_argument("--op-weights", type=float, nargs="+")
    gen.add_argument("--ramble-last", action="store_true", default=None)
    gen.add_argument("--max-pattern", type=int)
    gen.add_argument("--max-step", type=int)
    gen.add_argument("--max-run", type=int)
    gen.add_argument("--num-letters", type=int)
    gen.add_argument("--tag-stages", action="store_true", default=None)
    gen.set_defaults(func=_generate)

    score = sub.add_parser("score", help="score predictions (JSONL of {id, response}) against a dataset")
    score.add_argument("--data", required=True, help="examples written by 'generate'")
    score.add_argument("--predictions", help="JSONL of {'id': ..., KEY: response text}; default: the references")
    score.add_argument("--key", default="response", help="field holding the predicted text (default: response)")
    score.set_defaults(func=_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad config or data: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
