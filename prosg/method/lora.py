"""Export one prompt's ProSG delta as a PEFT LoRA adapter (``prosg export-lora``).

PEFT's LoRA computes ``W x + (lora_alpha / r) * B A x`` with ``A = lora_A.weight [r, Din]``
and ``B = lora_B.weight [Dout, r]``; the delta is ``scale * U V^T``. So ``B = U``,
``A = V^T``, ``r`` the delta's rank and ``lora_alpha = scale * r``: the adapter's
scaling is the delta's scale.

RWKV-4 rescaling: transformers' ``RwkvForCausalLM`` in eval mode divides the weights of
``attention.output`` and ``feed_forward.value`` of block ``i`` in place by
``2 ** (i // rescale_every)``; a LoRA branch beside them is not divided. prosg scales the
whole projection (its delta included), so ``B`` of those layers carries the factor. The
exported adapter thus reproduces prosg's logits in eval mode (what generation uses);
in train mode transformers does not rescale, and for a model with ``rescale_every > 0``
the factor of those layers would then be wrong (run it in eval mode).

The delta applies at every position the adapter sees; prosg applies it from the
prompt's last token on. To reproduce a ProSG generation, run the prompt but its last
token through the plain model (``with model.disable_adapter():``), then the rest with
the adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prosg.models.state import Delta, parse_delta_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_tensors(delta: Delta, model, sample: int = 0) -> tuple[dict[str, torch.Tensor], int, float]:
    """``(PEFT state dict, r, lora_alpha)`` of sample ``sample`` of ``delta``."""
    ranks = {uv[0].shape[-1] for uv in delta.factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"export-lora: the delta's modules have different ranks {sorted(ranks)}; a PEFT LoRA "
                         "config has one r")
    (r,) = ranks
    rescale = getattr(model.config, "rescale_every", 0) or 0
    tensors = {}
    for name, (U, V) in delta.factors.items():
        layer, part, kind = parse_delta_name(name)
        B = U[sample].detach().float().cpu()
        if rescale > 0 and (part, kind) in (("attention", "output"), ("feed_forward", "value")):
            B = B * 2.0 ** -(layer // rescale)
        prefix = f"base_model.model.rwkv.{name}"
        tensors[f"{prefix}.lora_A.weight"] = V[sample].detach().float().cpu().t().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
    return tensors, r, float(delta.scale) * r


def export_lora(delta: Delta, model, out: str | Path, *, base_path: str | None = None, sample: int = 0) -> Path:
    """Writes ``out/adapter_config.json`` (peft's own LoraConfig) and
    ``out/adapter_model.safetensors``; atomically each."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("export-lora needs the 'peft' package (pip install peft)") from e
    from safetensors.torch import save_file

    from prosg.method.outputs import atomic_write

    tensors, r, alpha = lora_tensors(delta, model, sample)
    targets = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                        task_type="CAUSAL_LM", base_model_name_or_path=base_path)
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    # LoraConfig.save_pretrained writes adapter_config.json; write it beside, then move it in
    tmp = out / ".adapter_config.tmp"
    tmp.mkdir(exist_ok=True)
    config.save_pretrained(str(tmp))
    (tmp / ADAPTER_CONFIG).replace(out / ADAPTER_CONFIG)
    tmp.rmdir()
    return out
