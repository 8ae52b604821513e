"""Latents to frames and back: the latent space (:mod:`.latents`), the streaming Wan2.1 VAE decoder
(:mod:`.vae`) and the tiny preview decoder (:mod:`.taew`) over their shared causal cache
(:mod:`.decode_stream`), the VAE encoder (:mod:`.vae_encode`), Krea Realtime's context re-encoder
(:mod:`.reencode`) and the frames written while the DiT goes on (:mod:`.frames`). Imports
:mod:`cascade_core.sampling` (its events), :mod:`cascade_core.weights` and :mod:`cascade_core.common`."""
