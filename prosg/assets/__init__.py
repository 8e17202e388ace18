"""Files shipped with prosg: the tiny RWKV-4 base model of the forgetting benchmark
(``base_model/``, loaded by :func:`prosg.method.pretrain.load_base_model`)."""
