"""Files of weights, read without running pickled code (:mod:`.safe_io`): the DiT in every layout
(:mod:`.checkpoint`, its key names :mod:`.dit_names`, ComfyUI-GGUF files :mod:`.gguf_file`), LoRA files
(:mod:`.lora`), the umt5-xxl text
encoder (:mod:`.text`) and the VAE's key names (:mod:`.vae_names`). Imports :mod:`cascade_core.model`
(the module the weights go into) and :mod:`cascade_core.common`."""
