"""Block Cascade engine: block-causal Wan2.1 video generation with Block Cascading.

Pure PyTorch; never imports ComfyUI. Modules:
  safe_io     reading tensor files without running pickled code
  model       the Wan2.1 T2V DiT (original parameter names, config read from the weights)
  schedule    flow-matching step list (FlowSchedule) and the cascade tick plan (CascadeSchedule)
  kv_pool     preallocated self-attention K/V: sink, rolling window, in-flight blocks
  attention   one attention function over several backends
  sampler     runs the ticks: noise, batched forwards, re-noising, clean passes, prompt switches
  cli         ``python -m cascade_core generate``
"""
__version__ = "0.1.0"
