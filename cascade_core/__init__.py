"""Block Cascade engine: block-causal Wan2.1 video generation with Block Cascading.

Pure PyTorch; never imports ComfyUI. Sub-packages, lowest first; each imports only those above it in
this list (``tests/architecture`` holds it so):

  common/       constants of the latent space and the text context, one-line messages, host/device copies, Ctrl-C
  model/        the Wan2.1 DiT, the block grid, the KV pool and its attention, attention kernels, fp8 products
  weights/      files of weights read safely: the DiT in every layout, LoRA, the text encoder, key-name tables
  sampling/     a run's settings, the families, the one run plan, noise, steering, memory, the tick loop
  video/        latent space, the streaming Wan2.1 VAE decoder and taew, the encoder, frame writers
  distributed/  several devices sharing one KV pool (worker processes, torchrun)
  session/      one run as every frontend drives it: its plan, memory, runner (one device, a pool, torchrun), close
  cli/          ``python -m cascade_core generate|decode`` and ``python -m cascade_core.bench``
  client/       ``python -m cascade_core.client``: the headless ComfyUI client (imports common/ only)

"parallel" means blocks in flight (``CascadeConfig.parallel``); several devices are ``distributed``.

The public API, importable from here (each imported on first use, so ``import cascade_core`` stays light):
:func:`generate` (the tick loop), :class:`CascadeConfig`, :class:`PromptSchedule`, :func:`load_dit`,
:func:`step_noise` (the one re-noising draw), :func:`block_noise`, :class:`WanConfig`, :class:`WanModel`,
:class:`WanVAEDecoder`, :func:`raw_to_normalized` and :func:`normalized_to_raw`.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "generate": "sampling.loop", "CascadeConfig": "sampling.config", "PromptSchedule": "sampling.config",
    "load_dit": "weights.checkpoint", "step_noise": "sampling.noise", "block_noise": "sampling.noise",
    "WanConfig": "model.dit", "WanModel": "model.dit", "WanVAEDecoder": "video.vae",
    "raw_to_normalized": "video.latents", "normalized_to_raw": "video.latents",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cascade_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
