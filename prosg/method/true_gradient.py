"""The ``true_gradient`` baseline: what ProSG approximates, computed for real at test time.

ProSG predicts a low-rank weight change from the prompt's states in one forward pass of
a small network (a *synthetic* gradient). This baseline takes the real thing instead:
for each prompt it back-propagates the frozen model's LM loss over the prompt tokens
(next-token cross-entropy, teacher forced, each prompt's own mean) to every target
matrix, and moves the weights against that gradient:

    G_b     = d loss_b / d W            per prompt b, the full [Dout, Din] gradient
    Delta_b <- Delta_b - lr * G_b       ``steps`` times, G_b taken at W + Delta_b
    Delta_b ~ U_b V_b^T                 truncated SVD to rank r (the form ProSG's delta has)

The rank-r delta is then applied exactly as ProSG's: from the prompt's last token on,
while the response is generated (:func:`prosg.method.evaluation.evaluate`).

Per-prompt gradients come from the model's per-sample delta path itself: a delta with
``V = I`` (rank ``Din``) and ``U = Delta_b`` makes the sample's weight ``W + U``, so the
gradient with respect to ``U_b`` is the gradient with respect to sample ``b``'s weight
(one batched backward, no per-sample loop, the base weights untouched).

``lr`` is tuned on benchmark examples the test seeds never use (:func:`tune_lr`, seed 0,
the generator's training seed); its cost per prompt is measured by ``prosg eval`` beside
ProSG's one generator forward (``methods.<name>.cost`` in ``report.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from prosg.method.generator import DEFAULT_TARGETS, _check_prompt, resolve_targets
from prosg.models import Delta
from prosg.models.protocol import RecurrentLM


@dataclass
class TrueGradientConfig:
    """Settings of the true-gradient baseline (flags of ``prosg eval``/``demo`` as ``--tg-*``)."""

    lr: float | None = field(default=None, metadata={
        "help": "step size on the prompt's LM-loss gradient (default: tuned on 64 seed-0 examples)",
        "type": float, "min": 0, "above": True})
    steps: int = field(default=1, metadata={"help": "gradient steps per prompt", "min": 1})
    multi_steps: int = field(default=4, metadata={"help": "steps of the true_gradient_multi row", "min": 1})
    rank: int = field(default=4, metadata={"help": "rank r of the applied delta (truncated SVD)", "min": 1})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
        "help": "matrices that move (the generator's default: every projection)"})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        for name in ("steps", "rank", "multi_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrueGradientConfig.{name} must be an int >= 1, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0 or self.lr == float("inf")):
            raise ValueError(f"TrueGradientConfig.lr must be a positive finite float or None, got {self.lr!r}")


def prompt_loss(model: RecurrentLM, ids: Tensor, mask: Tensor, delta: Delta | None = None) -> Tensor:
    """``[B]`` each right-packed prompt's mean next-token cross-entropy over its real
    tokens (a one-token prompt has no target: its loss is 0)."""
    logits, _ = model(ids, delta=delta)
    targets = ids[:, 1:]
    valid = mask[:, 1:] & mask[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none").view_as(targets)
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


def prompt_gradients(model: RecurrentLM, prompt_ids: Tensor, prompt_mask: Tensor | None, names: Sequence[str],
                     dense: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-prompt gradients ``{name: [B, Dout, Din]}`` of :func:`prompt_loss` with
    respect to each matrix ``name``, at the weights ``W + dense[name][b]`` (``dense``:
    per-prompt weight changes, default none). ``prompt_mask``: the real tokens (any
    padding side). The model is not changed and gets no ``.grad``."""
    ids, mask = _check_prompt(model, prompt_ids, prompt_mask)
    shapes = model.delta_shapes()
    B = ids.shape[0]
    params = model.parameters()
    dtype = next(params).dtype
    us, factors = [], {}
    for name in names:
        d_out, d_in = shapes[name]
        start = dense[name] if dense is not None else torch.zeros(B, d_out, d_in, dtype=dtype, device=ids.device)
        u = start.detach().to(dtype).clone().requires_grad_(True)
        eye = torch.eye(d_in, dtype=dtype, device=ids.device).expand(B, d_in, d_in)
        factors[name] = (u, eye)
        us.append(u)
    with torch.enable_grad():
        # the sum of per-prompt losses: prompts do not interact, so each U_b gets its own gradient
        loss = prompt_loss(model, ids, mask, Delta(factors, 1.0)).sum()
        grads = torch.autograd.grad(loss, us)
    return {name: g.detach() for name, g in zip(names, grads)}


def low_rank(dense: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U [B, Dout, r], V [B, Din, r])`` with ``U V^T`` the best rank-``r``
    approximation of ``dense [B, Dout, Din]`` (truncated SVD; ``U`` carries the singular
    values, ``V`` has orthonormal columns)."""
    P, S, Qh = torch.linalg.svd(dense.double(), full_matrices=False)
    r = min(rank, S.shape[-1])
    U = (P[..., :r] * S[..., None, :r]).to(dense.dtype)
    V = Qh[..., :r, :].transpose(-1, -2).to(dense.dtype)
    return U.contiguous(), V.contiguous()


def true_gradient_delta(model: RecurrentLM, prompt_ids: Tensor, prompt_mask: Tensor | None,
                        config: TrueGradientConfig, lr: float | None = None) -> Delta:
    """The baseline's rank-``r`` delta for a prompt batch: ``config.steps`` steps of
    size ``lr`` (default ``config.lr``) against each prompt's own LM-loss gradient,
    then a truncated SVD of the accumulated change."""
    lr = config.lr if lr is None else lr
    if lr is None:
        raise ValueError("true_gradient needs a learning rate: set TrueGradientConfig.lr or tune it (tune_lr)")
    names = resolve_targets(config.targets, model.delta_shapes())
    dense = None
    for _ in range(config.steps):
        grads = prompt_gradients(model, prompt_ids, prompt_mask, names, dense)
        dense = {n: (0 if dense is None else dense[n]) - lr * g for n, g in grads.items()}
    return Delta({n: low_rank(d, config.rank) for n, d in dense.items()}, 1.0)


def true_gradient_delta_fn(model: RecurrentLM, config: TrueGradientConfig, lr: float | None = None):
    """``evaluate``'s ``delta_fn`` for this baseline (gradients are taken inside; the
    evaluation's ``no_grad`` does not reach them)."""

    def delta_fn(batch):
        return true_gradient_delta(model, batch.prompt_ids.to(model.device), batch.prompt_mask.to(model.device),
                                   config, lr)

    return delta_fn


#: Learning rates :func:`tune_lr` tries (a geometric grid over four and a half decades;
#: on the bundled bases the best was at its low end, docs/results.md).
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def tune_lr(model: RecurrentLM, examples, config: TrueGradientConfig, grid: Sequence[float] = LR_GRID,
            *, batch_size: int = 32) -> tuple[float, list[dict]]:
    """The ``lr`` of ``grid`` with the best last-stage compliance on ``examples`` (ties:
    the better overall compliance, then the smaller lr), and each lr's scores."""
    from prosg.method.evaluation import evaluate

    rows = []
    for lr in grid:
        r = evaluate(model, examples, delta_fn=true_gradient_delta_fn(model, config, lr), batch_size=batch_size)
        rows.append({"lr": lr, "last_stage": r.last_stage["compliance"], "overall": r.overall["compliance"],
                     "first_stage": r.by_stage[0]["compliance"] if r.by_stage else None})
    best = max(rows, key=lambda x: (x["last_stage"] or 0.0, x["overall"] or 0.0, -x["lr"]))
    return best["lr"], rows
