"""The network and what its forward attends through: the Wan2.1 DiT (:mod:`.dit`; its configuration read off
the weights, :mod:`.wan_config`), the block grid
(:mod:`.grid`: which latent frames each block holds), the KV pool (:mod:`.kv_pool`, its storage in the
model's dtype or fp8 :mod:`.kv_store`) and its attention (:mod:`.pool_attention`), the attention kernels
(:mod:`.attention`, :mod:`.attention_libraries`), stored weights: fp8 layers and the one reader of stored
weights for the model (:mod:`.fp8`), GGUF layers (:mod:`.gguf`), blocks streamed from host memory
(:mod:`.block_swap`), and the compile choice (:mod:`.compiling`). Imports only :mod:`cascade_core.common`."""
