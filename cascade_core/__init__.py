"""Block Cascade engine: block-causal Wan2.1 video generation with Block Cascading.

Pure PyTorch; never imports ComfyUI. Modules:
  safe_io     reading tensor files without running pickled code
  model       the Wan2.1 T2V DiT (original parameter names, config read from the weights)
  schedule    flow-matching step list (FlowSchedule) and the cascade tick plan (CascadeSchedule)
  kv_pool     preallocated self-attention K/V: sink, rolling window, in-flight blocks
  attention   one attention function over several backends (log-sum-exp for exact merges)
  sampler     runs the ticks: batched forwards, re-noising, clean passes, prompt switches, endless runs
  noise       the run's random numbers (one generator per draw)
  latent_window  the clean latents a run reads back (the whole video, or an endless one's last frames)
  steer       the prompt of every block, and switches that arrive while a run goes on
  fp8         optional fp8 matrix products
  checkpoint  one loader for every DiT layout, with named errors
  dit_names   the DiT's weight names in each layout, and the checks that weights are a Wan2.1 T2V DiT
  vae, taew   streaming Wan2.1 VAE decoder and the tiny preview decoder
  frames      frames out while the DiT goes on (decode per finished block; MP4/PNG)
  text        umt5-xxl prompt embeddings from local files
  distributed several devices sharing the KV pool (torch.distributed)
  memory      how much memory a run needs and a device has (one estimate for nodes and CLI)
  cli, cli_checks, cli_run  ``python -m cascade_core generate|decode``; bench: ``python -m cascade_core.bench``
  client      the headless ComfyUI client (client_steer: its --steer; client_io: HTTP, progress bar)
  stop        Ctrl-C as a request to stop (the command line's runs and the client)
"""
__version__ = "0.1.0"

# The main entry points, imported on first use (importing the package itself stays light)
_EXPORTS = {"generate": "sampler", "CascadeConfig": "sampler", "PromptSchedule": "sampler",
            "load_dit": "checkpoint"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cascade_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
