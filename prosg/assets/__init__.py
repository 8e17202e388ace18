"""Files shipped with prosg: the tiny base models of the forgetting benchmark
(``rwkv4/``, ``rwkv7/``, ``rwkv4_tbptt/``, loaded by
:func:`prosg.method.pretrain.load_base_model`; docs/base_model.md)."""
