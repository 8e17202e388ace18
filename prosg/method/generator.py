"""The ProSG synthetic-gradient generator: prompt states -> a low-rank weight delta.

For a target matrix ``W [Dout, Din]`` the gradient of a loss over the prompt is
``sum_t delta_t x_t^T`` (``x_t`` the matrix's input at prompt token ``t``, ``delta_t``
the loss gradient at its output). The generator reads the frozen model's per-token
hidden states of the prompt (every layer's, through a shared trunk), predicts a
``delta_hat_t`` per token, and pools them at rank ``r`` with ``r`` learned softmax
weightings over the prompt tokens:

    z_t         = per-target GELU layer over the trunk's code of token t and the summary
    delta_hat_t = D z_t + g * head[id_t]        (g: residual-stream targets only)
    alpha[:, i] = softmax_t(w_i . z_t)          (masked to the prompt's tokens)
    U_i         = sum_t alpha_ti * delta_hat_t  U [B, Dout, r]
    V           = V0 / sqrt(Din)                V [Din, r], learned, the same for every prompt
    Delta W     = scale * U V^T

``head[id_t]`` is the LM head's row of prompt token ``t``: the form a true LM-loss
gradient has at the residual stream, and the way the delta can make the model emit a
token of the prompt. Other inputs ``V`` (the pooled true inputs ``x_t``, or a learned
map) and per-layer features are options. The exact formulation and what is our
interpretation is in ``docs/method.md``; measurements in ``docs/results.md``.
The base model stays frozen: it runs under ``no_grad`` and only the generator's
parameters are trained; the delta is applied by the model's fused kernels
(:class:`prosg.models.Delta`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.models import Delta
from prosg.models.protocol import LayerInputs, RecurrentLM
from prosg.models.state import parse_delta_name

#: Default targets: every projection matrix of every layer (7 on RWKV-4, 6 on RWKV-7;
#: docs/method.md lists them, docs/results.md compares subsets).
DEFAULT_TARGETS = ("blocks.*.attention.*", "blocks.*.feed_forward.*")

@dataclass
class GeneratorConfig:
    """Hyper-parameters of :class:`SyntheticGradientGenerator`.

    Attributes:
        targets: module names or ``fnmatch`` patterns over
            :meth:`RecurrentLM.delta_shapes` (``blocks.*.attention.key``); each must match.
        rank: ``r`` of every delta ``U V^T``.
        scale: the delta's ``scale`` (``W + scale * U V^T``).
        hidden_size: width of the per-target trunk ``z_t``.
        input_mode: ``"true"``: ``x_hat_t`` is the matrix's true input where the hooks
            give it (all but ``attention.output``), a learned map elsewhere;
            ``"learned"``: a learned map of the hidden state everywhere;
            ``"shared"``: ``V`` is a learned parameter of the target, the same for
            every prompt (a learned input subspace), and only ``U`` depends on the
            prompt.
        features: what a target's head reads at each prompt token: ``"layer"``: the
            LayerNorm output of the target's own layer (``ln1`` for time-mix, ``ln2``
            for channel-mix targets); ``"all"``: every layer's ``ln1`` and ``ln2``
            outputs, concatenated with a sinusoidal code of each token's distance from
            the prompt's end (the causal states cannot tell how far from the end a
            token is, e.g. whether it belongs to the last instruction), and passed
            through a shared trunk (``depth`` GELU layers of width ``hidden_size``)
            that all heads read.
        depth: number of GELU layers of the shared trunk (``features="all"`` only).
        encoder_layers: bidirectional self-attention layers (``nn.TransformerEncoder``,
            ``heads`` heads, pads masked) over the trunk's per-token codes
            (``features="all"`` only). The prompt states are causal: the state at token
            ``t`` knows nothing of the tokens after it, while a true gradient's
            ``delta_t`` depends on what follows ``t`` (at least on token ``t+1``, the
            target of position ``t``). With an encoder, ``delta_hat_t`` sees the whole
            prompt.
        heads: attention heads of the encoder.
        copy_tokens: for targets that write into the residual stream
            (``attention.output``, ``feed_forward.value``), add ``g * head[id_t]`` to
            ``delta_hat_t`` (``head[id_t]``: the output embedding of prompt token
            ``t``, ``g`` a learned per-target scalar starting at 0). A true LM-loss
            gradient at the residual stream has this form (``head^T (p - onehot)``
            through the final LayerNorm), and it gives the delta a direct way to make
            the model emit a token of the prompt.
    """

    # Each field's metadata is its command-line flag's help (prosg train/demo build
    # their generator options from these fields); "min" bounds an int.
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
        "help": "comma-separated module names or fnmatch patterns of the matrices that carry a delta"})
    rank: int = field(default=4, metadata={"help": "rank r of every delta U V^T", "min": 1})
    scale: float = field(default=1.0, metadata={"help": "the delta's scale: W + scale * U V^T"})
    hidden_size: int = field(default=64, metadata={"help": "width of the generator's trunk", "min": 1})
    input_mode: str = field(default="shared", metadata={
        "help": "where V comes from: a learned input subspace per target (shared), the matrix's true inputs "
                "(true) or a learned map of the hidden state (learned)", "choices": ("shared", "true", "learned")})
    features: str = field(default="all", metadata={
        "help": "what the heads read: every layer's normalised inputs through a shared trunk (all) or the "
                "target's own layer (layer)", "choices": ("all", "layer")})
    depth: int = field(default=1, metadata={"help": "GELU layers of the shared trunk", "min": 1})
    encoder_layers: int = field(default=0, metadata={
        "help": "bidirectional encoder layers over the prompt (features=all only)", "min": 0})
    heads: int = field(default=4, metadata={"help": "attention heads of the encoder", "min": 1})
    copy_tokens: bool = field(default=True, metadata={
        "help": "the head-row (copy) term of the residual-stream targets"})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("GeneratorConfig.targets must name at least one module, got none")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"GeneratorConfig.rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"GeneratorConfig.hidden_size must be an int >= 1, got {self.hidden_size!r}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ValueError(f"GeneratorConfig.scale must be a finite float, got {self.scale!r}")
        if self.input_mode not in ("true", "learned", "shared"):
            raise ValueError(f"GeneratorConfig.input_mode must be 'true', 'learned' or 'shared', "
                             f"got {self.input_mode!r}")
        if self.features not in ("layer", "all"):
            raise ValueError(f"GeneratorConfig.features must be 'layer' or 'all', got {self.features!r}")
        for name, lo in (("depth", 1), ("encoder_layers", 0), ("heads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"GeneratorConfig.{name} must be an int >= {lo}, got {v!r}")
        if self.encoder_layers and self.features != "all":
            raise ValueError(f"GeneratorConfig.encoder_layers={self.encoder_layers} needs features='all' "
                             f"(the encoder runs on the shared trunk), got features={self.features!r}")
        if self.encoder_layers and self.hidden_size % self.heads:
            raise ValueError(f"GeneratorConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"heads ({self.heads})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GeneratorConfig: unknown fields {sorted(unknown)}")
        targets = d.get("targets", DEFAULT_TARGETS)
        return cls(**{**d, "targets": targets if isinstance(targets, str) else tuple(targets)})


def resolve_targets(patterns: tuple[str, ...] | list[str], shapes: dict[str, tuple[int, int]]) -> list[str]:
    """The module names of ``shapes`` that ``patterns`` select, in the model's order.
    A pattern that selects nothing is an error naming the valid names."""
    chosen: set[str] = set()
    for pattern in patterns:
        bare = pattern.removeprefix("rwkv.").removesuffix(".weight")
        hits = [n for n in shapes if fnmatch.fnmatchcase(n, bare)]
        if not hits:
            if not any(c in bare for c in "*?["):
                parse_delta_name(bare)  # a malformed name gets the model's own message
            kinds: dict[str, list[str]] = {}
            for n in shapes:
                _, part, kind = parse_delta_name(n)
                if kind not in kinds.setdefault(part, []):
                    kinds[part].append(kind)
            valid = " and ".join(f"blocks.<i>.{part}.{{{','.join(ks)}}}" for part, ks in kinds.items())
            examples = ", ".join(list(shapes)[:4])
            raise ValueError(f"generator target {pattern!r} matches no module of the model; valid names are "
                             f"{valid} with i < {1 + max(parse_delta_name(n)[0] for n in shapes)} (e.g. {examples})")
        chosen.update(hits)
    return [n for n in shapes if n in chosen]


@dataclass
class PromptFeatures:
    """What the generator reads from the frozen model over a prompt batch.

    ``ln1[l]``/``ln2[l]``: ``[B, P, H]`` the normalised inputs of layer ``l``'s
    token mixing / channel mixing at every prompt position (RWKV: the ``ln1`` and
    ``ln2`` outputs); ``summary``: ``[B, H]`` the final normalised state at each
    prompt's last real token (what the whole prompt left in the state); ``mask``:
    ``[B, P]`` bool, the real tokens; ``ids``: ``[B, P]`` the (right-packed) prompt
    token ids; ``final``: ``[B, P, H]`` the final normalised state at every position.
    """

    ln1: list[Tensor]
    ln2: list[Tensor]
    summary: Tensor
    mask: Tensor
    ids: Tensor | None = None
    extra: dict = field(default_factory=dict)
    final: Tensor | None = None


def _check_prompt(model: RecurrentLM, prompt_ids: Tensor, prompt_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validates a prompt batch and returns it right-padded: each row's real tokens (in
    order) first, pads after, so that the model reads every real token exactly as it
    would without padding. Left-padded batches (prosg.data's default) are re-packed."""
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be a [B, P] LongTensor, got "
                         f"{tuple(prompt_ids.shape) if isinstance(prompt_ids, Tensor) else type(prompt_ids)}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must hold at least one sample and one token, got shape {tuple(prompt_ids.shape)}")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    if not isinstance(prompt_mask, Tensor) or tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(f"prompt_mask must have the shape of prompt_ids {tuple(prompt_ids.shape)}, "
                         f"got {tuple(prompt_mask.shape) if isinstance(prompt_mask, Tensor) else type(prompt_mask)}")
    prompt_mask = prompt_mask.to(device=prompt_ids.device, dtype=torch.bool)
    lengths = prompt_mask.sum(1)
    if bool((lengths == 0).any()):
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"empty prompt in row(s) {rows}: the generator needs at least one prompt token per sample")
    order = torch.argsort((~prompt_mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    return prompt_ids.gather(1, order), prompt_mask.gather(1, order)


@torch.no_grad()
def prompt_features(model: RecurrentLM, prompt_ids: Tensor, prompt_mask: Tensor | None = None) -> PromptFeatures:
    """Runs the frozen ``model`` over the prompts and collects the per-token
    normalised inputs of every layer (:meth:`RecurrentLM.layer_inputs`; the model is
    not changed). ``prompt_mask`` marks the real tokens (any padding side; the features
    come back right-padded). No gradient reaches the model."""
    prompt_ids, mask = _check_prompt(model, prompt_ids, prompt_mask)
    inputs = model.layer_inputs(prompt_ids)
    final = inputs.final
    last = (mask.sum(1) - 1).view(-1, 1, 1).expand(-1, 1, final.shape[-1])
    summary = final.gather(1, last).squeeze(1)
    feats = PromptFeatures(inputs.attention, inputs.feed_forward, summary, mask, prompt_ids, final=final)
    P = prompt_ids.shape[1]
    assert all(t.shape[1] == P for t in feats.ln1 + feats.ln2)
    return feats


@torch.no_grad()
def true_input(model: RecurrentLM, feats: PromptFeatures, name: str) -> Tensor | None:
    """The input ``x_t [B, P, Din]`` of matrix ``name`` at every prompt token, rebuilt
    by the model from the collected layer inputs exactly as its forward computes it
    (base weights, no delta); None where the model does not rebuild it (RWKV-4:
    ``attention.output``)."""
    return model.delta_input(name, LayerInputs(feats.ln1, feats.ln2, feats.final))


#: Width of the sinusoidal code of a token's distance from the prompt's end.
_POSITION_FEATURES = 16


def _distance_from_end(mask: Tensor) -> Tensor:
    """``[B, P, 16]`` sin/cos of each token's distance ``d`` from its row's last real
    token (``d = 0`` there) at wavelengths from 3 to 1000 tokens, geometrically spaced,
    for right-packed ``mask``; no length limit (pads get negative ``d``; pooling never
    reads them)."""
    lengths = mask.sum(1, keepdim=True)
    d = (lengths - 1 - torch.arange(mask.shape[1], device=mask.device)).to(torch.float64)  # [B, P]
    wavelengths = torch.logspace(math.log10(3), 3, _POSITION_FEATURES // 2, dtype=torch.float64, device=mask.device)
    freqs = 2 * torch.pi / wavelengths
    angles = d.unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _TargetHead(nn.Module):
    """The per-target part of the generator (one per modified matrix)."""

    def __init__(self, hidden: int, width: int, d_out: int, d_in: int, rank: int, input_kind: str,
                 copy_tokens: bool = False):
        super().__init__()
        # g of delta_hat_t += g * head[id_t] (GeneratorConfig.copy_tokens); 0 at the start
        self.copy_gain = nn.Parameter(torch.zeros(())) if copy_tokens else None
        self.token = nn.Linear(hidden, width)
        self.context = nn.Linear(hidden, width, bias=False)
        self.pool = nn.Linear(width, rank)
        self.delta = nn.Linear(width, d_out, bias=False)
        self.input = nn.Linear(width, d_in, bias=False) if input_kind == "learned" else None
        # "shared": V is one learned [Din, r] basis for every prompt (unit-norm columns
        # at the start, as the pooled V of the other modes is ~ x / sqrt(Din)).
        self.shared_input = nn.Parameter(torch.randn(d_in, rank)) if input_kind == "shared" else None
        # Zero delta head: U = 0, so the initial delta is exactly zero and training
        # starts from the base model (as LoRA's zero B). The pooling weights stay
        # random: with equal pools all r components would be equal and get equal
        # gradients forever (the delta would stay rank one).
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.pool.bias)

    def forward(self, h: Tensor, summary: Tensor, mask: Tensor, x: Tensor | None,
                copy_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # z_t = GELU(A h_t + C s + b): the token's state and the whole prompt's summary
        z = F.gelu(self.token(h) + self.context(summary).unsqueeze(1))  # [B, P, width]
        logits = self.pool(z).masked_fill(~mask.unsqueeze(-1), float("-inf"))  # [B, P, r]
        alpha = torch.softmax(logits, dim=1)
        d_hat = self.delta(z)  # [B, P, Dout]
        if self.copy_gain is not None:
            d_hat = d_hat + self.copy_gain * copy_rows
        U = torch.einsum("bpr,bpo->bor", alpha, d_hat)
        if self.shared_input is not None:
            V = (self.shared_input / math.sqrt(self.shared_input.shape[0])).expand(U.shape[0], -1, -1)
            return U, V
        x_hat = self.input(z) if x is None else x  # [B, P, Din]
        V = torch.einsum("bpr,bpi->bir", alpha, x_hat) / math.sqrt(x_hat.shape[-1])
        return U, V


class SyntheticGradientGenerator(nn.Module):
    """Predicts a per-prompt low-rank delta (a synthetic gradient) for a frozen RWKV-4 or RWKV-7.

    ``generator(model, prompt_ids, prompt_mask) -> Delta`` with ``U [B, Dout, r]``,
    ``V [B, Din, r]`` for every target; pass it to ``model(ids, delta=...)`` or
    ``model.generate(ids, n, delta=...)``. ``prompt_mask`` marks each row's real tokens
    (left or right padding); padding does not change the delta.

    The generator is built for one model shape (``model.delta_shapes()``); its
    parameters are all that training changes.
    """

    def __init__(self, model: RecurrentLM, config: GeneratorConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else GeneratorConfig()
        shapes = model.delta_shapes()
        self.targets = resolve_targets(config.targets, shapes)
        self.shapes = {n: shapes[n] for n in self.targets}
        self.hidden_size = model.config.hidden_size
        self.num_layers = model.config.num_hidden_layers
        self.trunk = None
        head_input = self.hidden_size
        if config.features == "all":
            # Every layer's per-token states (2L LayerNorm outputs) -> one shared code per
            # token: the token's identity (layer 0) and its context (later layers) together.
            layers: list[nn.Module] = []
            width_in = 2 * self.num_layers * self.hidden_size + _POSITION_FEATURES
            for _ in range(config.depth):
                layers += [nn.Linear(width_in, config.hidden_size), nn.GELU()]
                width_in = config.hidden_size
            self.trunk = nn.Sequential(*layers)
            self.encoder = None
            if config.encoder_layers:
                layer = nn.TransformerEncoderLayer(config.hidden_size, config.heads, 2 * config.hidden_size,
                                                   dropout=0.0, activation="gelu", batch_first=True,
                                                   norm_first=True)
                # No nested-tensor fast path: train and eval must compute the same function.
                self.encoder = nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)
            self.summary_proj = nn.Linear(self.hidden_size, config.hidden_size, bias=False)
            head_input = config.hidden_size
        self.heads = nn.ModuleDict()
        for name in self.targets:
            layer, part, kind = parse_delta_name(name)
            d_out, d_in = shapes[name]
            kind_of_input = config.input_mode
            if kind_of_input == "true" and not model.has_delta_input(name):
                kind_of_input = "learned"
            writes_residual = model.writes_residual(name)
            self.heads[self._key(name)] = _TargetHead(head_input, config.hidden_size, d_out, d_in,
                                                      config.rank, kind_of_input,
                                                      config.copy_tokens and writes_residual)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")  # ModuleDict keys cannot hold dots

    def _check_model(self, model: RecurrentLM) -> None:
        if not isinstance(model, RecurrentLM):
            raise TypeError(f"model must be a prosg model (prosg.models.protocol.RecurrentLM, e.g. "
                            f"prosg.models.RWKV4LM), got {type(model)}")
        shapes = model.delta_shapes()
        for name, shape in self.shapes.items():
            if shapes.get(name) != shape:
                raise ValueError(f"the generator was built for {name} of shape {shape}, the model has "
                                 f"{shapes.get(name)}: a generator belongs to one model shape")

    def forward(self, model: RecurrentLM, prompt_ids: Tensor, prompt_mask: Tensor | None = None) -> Delta:
        self._check_model(model)
        feats = prompt_features(model, prompt_ids, prompt_mask)
        return self.from_features(model, feats)

    def from_features(self, model: RecurrentLM, feats: PromptFeatures) -> Delta:
        """The delta from already collected :func:`prompt_features` (lets a caller run
        the prompt once for several generators or steps)."""
        dtype = self.heads[self._key(self.targets[0])].token.weight.dtype
        summary = feats.summary.to(dtype)
        shared = None
        if self.trunk is not None:
            position = _distance_from_end(feats.mask).to(dtype)
            shared = self.trunk(torch.cat([t.to(dtype) for t in feats.ln1 + feats.ln2] + [position], dim=-1))
            if self.encoder is not None:
                shared = self.encoder(shared, src_key_padding_mask=~feats.mask)
            summary = self.summary_proj(summary)
        head_rows = None  # [B, P, H] LM-head rows of the prompt tokens, shared by every copy-term head
        factors = {}
        for name in self.targets:
            layer, part, kind = parse_delta_name(name)
            head = self.heads[self._key(name)]
            h = shared if shared is not None else (feats.ln1 if part == "attention" else feats.ln2)[layer].to(dtype)
            x = None
            if head.input is None and head.shared_input is None:
                x = feats.extra.get(name)
                if x is None:
                    x = feats.extra[name] = true_input(model, feats, name)
                x = x.to(dtype)
            # Pads: their h/x are finite (the model ran over them) and alpha is exactly
            # zero there, so they contribute nothing.
            if head.copy_gain is not None and head_rows is None:
                head_rows = F.embedding(feats.ids, model.output_embeddings()).to(dtype)
            factors[name] = head(h, summary, feats.mask, x, head_rows if head.copy_gain is not None else None)
        return Delta(factors, float(self.config.scale))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ directories

    #: The base model this generator belongs to (:func:`prosg.method.train.base_identity`),
    #: set by training and loading; save_pretrained records it.
    base_identity: dict | None = None
    #: The text tokenizer it was trained with (:mod:`prosg.data.text`), when known.
    tokenizer = None

    def save_pretrained(self, directory, model: RecurrentLM | None = None, *, tokenizer=None,
                        base_path: str | None = None) -> None:
        """Writes ``directory/generator.safetensors`` and ``generator_config.json``
        (settings, targets, the base model's identity, the tokenizer's spec and file;
        :mod:`prosg.method.pretrained`). ``model``: the base model (default: the one
        this generator was trained or loaded for); ``base_path``: where it loads from
        (a hint ``prosg generate`` uses when no ``--base`` is given)."""
        from prosg.method.pretrained import save_pretrained

        save_pretrained(self, directory, model, tokenizer=tokenizer, base_path=base_path)

    @classmethod
    def from_pretrained(cls, path, model: RecurrentLM) -> "SyntheticGradientGenerator":
        """The generator of a directory written by :meth:`save_pretrained` or ``prosg
        train`` (also a bare ``generator.safetensors``), for ``model``, in eval mode.
        Loading onto another base model than the one it was trained on is refused with
        a ValueError naming what differs (architecture, config fields, weights)."""
        from prosg.method.pretrained import load_pretrained

        return load_pretrained(path, model)[0]
