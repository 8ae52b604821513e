"""Block-causal sampling with Block Cascading: a run's settings (:mod:`.config`), the families' settings
(:mod:`.families`), noise levels and the cascade's ticks (:mod:`.schedule`), the one plan of a run
(:mod:`.plan`), the one memory estimate (:mod:`.memory`), the random numbers (:mod:`.noise`), prompts and
steering (:mod:`.steer`), the clean latents a run reads back (:mod:`.latent_window`), a context prefix
(:mod:`.context`), Krea Realtime's KV recompute (:mod:`.recompute`) and the tick loop (:mod:`.loop`).
Imports :mod:`cascade_core.model` and :mod:`cascade_core.common`."""
