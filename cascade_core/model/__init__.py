"""The network and what its forward attends through: the Wan2.1 DiT (:mod:`.dit`), the block grid
(:mod:`.grid`: which latent frames each block holds), the KV pool (:mod:`.kv_pool`) and its attention
(:mod:`.pool_attention`), the attention kernels (:mod:`.attention`, :mod:`.attention_libraries`) and
the optional fp8 matrix products with the one fp8 dequantiser (:mod:`.fp8`). Imports only
:mod:`cascade_core.common`."""
