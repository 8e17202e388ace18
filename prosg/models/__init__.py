"""RWKV-4 language model with per-sample low-rank weight deltas.

* :class:`RWKV4LM`: ``model(input_ids, state=None, delta=None) -> (logits, state)``,
  numerically transformers' ``RwkvForCausalLM``; checkpoints in transformers' and
  BlinkDL's layouts; batched ``generate`` / ``stream_generate``.
* :class:`RWKV4State`: the recurrent state (token-shift vectors and WKV state).
* :class:`Delta`: per-sample ``W + scale * U_b V_b^T`` for any projection matrix.
"""

from prosg.models.config import RWKV4Config
from prosg.models.generation import NonFiniteLogitsError, filter_logits, sample_next
from prosg.models.rwkv4 import RWKV4LM
from prosg.models.state import Delta, RWKV4State

__all__ = ["Delta", "NonFiniteLogitsError", "RWKV4Config", "RWKV4LM", "RWKV4State", "filter_logits", "sample_next"]
