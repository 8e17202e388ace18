"""Python entry points of the prosg ops (``torch.ops.prosg.*``) with their autograd
formulas and fake kernels, so they run under ``torch.compile(fullgraph=True)``."""

from prosg.ops.lowrank_linear import lowrank_linear
from prosg.ops.rwkv4_step import rwkv4_channel_mix_step, rwkv4_time_mix_step
from prosg.ops.rwkv7_step import rwkv7_channel_mix_step, rwkv7_time_mix_step
from prosg.ops.wkv4 import wkv4
from prosg.ops.wkv7 import wkv7

__all__ = ["lowrank_linear", "rwkv4_channel_mix_step", "rwkv4_time_mix_step", "rwkv7_channel_mix_step",
           "rwkv7_time_mix_step", "wkv4", "wkv7"]
