"""Capacity check for ProSG deltas (docs/results.md): an upper bound for any generator.

For each of N held-out prompts, free per-example factors U (and V, or one V shared by
all prompts with --shared-v) of the chosen target matrices are optimised with Adam on
that prompt's own reference response (teacher forcing, the training loss of
``prosg train``), then the model answers greedily under the result. A generator maps a
prompt to such factors without seeing the response, so it cannot do better; if this
fails, no generator for these targets and rank can work.

    python benchmarks/method_oracle.py --targets "blocks.*" --rank 4 --steps 300 --shared-v
"""

from __future__ import annotations

import argparse
import time

import torch

from prosg.data import generate_examples
from prosg.method.evaluation import evaluate
from prosg.method.generator import resolve_targets
from prosg.method.pretrain import load_base_model
from prosg.method.train import freeze, make_batch, prefix_state, response_loss
from prosg.models import Delta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="base model directory (default: the bundled one)")
    p.add_argument("--targets", default="blocks.*", help="comma-separated module patterns")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--n", type=int, default=32, help="held-out prompts")
    p.add_argument("--seed", type=int, default=1000, help="benchmark seed of the prompts")
    p.add_argument("--shared-v", action="store_true", help="one V for all prompts (the generator's default)")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, bench = load_base_model(args.base)
    freeze(model)
    examples = generate_examples(bench, args.n, seed=args.seed)
    batch = make_batch(bench, args.seed, range(args.n), filler_loss=False)
    state = prefix_state(model, batch.prompt_ids, batch.prompt_lengths)
    shapes = model.delta_shapes()
    names = resolve_targets(args.targets.split(","), shapes)
    n_v = 1 if args.shared_v else args.n
    factors = {name: (torch.zeros(args.n, shapes[name][0], args.rank, requires_grad=True),
                      (torch.randn(n_v, shapes[name][1], args.rank) / shapes[name][1] ** 0.5).requires_grad_())
               for name in names}

    def delta(index: torch.Tensor | None = None) -> Delta:
        out = {}
        for name, (U, V) in factors.items():
            U = U if index is None else U[index]
            out[name] = (U, V.expand(U.shape[0], -1, -1) if args.shared_v else (V if index is None else V[index]))
        return Delta(out, 1.0)

    opt = torch.optim.Adam([t for uv in factors.values() for t in uv], lr=args.lr)
    base = float(response_loss(model, batch, None, state))
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = response_loss(model, batch, delta(), state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"{len(names)} targets, rank {args.rank}, {'shared' if args.shared_v else 'per-prompt'} V: "
          f"loss {base:.3f} -> {float(loss):.3f} in {args.steps} steps ({time.perf_counter() - t0:.0f} s)")

    row = {e.id: i for i, e in enumerate(examples)}
    with torch.no_grad():
        for name, fn in (("baseline", None),
                         ("oracle", lambda b: delta(torch.tensor([row[m["id"]] for m in b.meta])).detach())):
            r = evaluate(model, examples, delta_fn=fn)
            stages = " ".join(f"{100 * g['compliance']:.1f}" for g in r.by_stage)
            print(f"{name:9s} compliance by stage: {stages}; last stage {100 * r.last_stage['compliance']:.1f}")


if __name__ == "__main__":
    main()
