"""RWKV-4 and RWKV-7 language models with per-sample low-rank weight deltas.

* :class:`RWKV4LM`: ``model(input_ids, state=None, delta=None) -> (logits, state)``,
  numerically transformers' ``RwkvForCausalLM``; checkpoints in transformers' and
  BlinkDL's layouts; batched ``generate`` / ``stream_generate``.
* :class:`RWKV7LM`: the same interface for RWKV-7 (x070), numerically the ``rwkv``
  package's; checkpoints in BlinkDL's and flash-linear-attention's layouts.
* :class:`RWKV4State`, :class:`RWKV7State`: the recurrent states.
* :class:`Delta`: per-sample ``W + scale * U_b V_b^T`` for any projection matrix.
"""

from prosg.models.config import RWKV4Config, RWKV7Config
from prosg.models.generation import NonFiniteLogitsError, filter_logits, sample_next
from prosg.models.rwkv4 import RWKV4LM
from prosg.models.rwkv7 import RWKV7LM
from prosg.models.state import Delta, RWKV4State, RWKV7State

__all__ = ["Delta", "NonFiniteLogitsError", "RWKV4Config", "RWKV4LM", "RWKV4State", "RWKV7Config", "RWKV7LM",
           "RWKV7State", "filter_logits", "sample_next"]
