"""Latents to frames and back: the latent spaces (:mod:`.latents`), the streaming Wan2.1 and Wan2.2 VAE decoders
(:mod:`.vae`, :mod:`.vae22`) and the tiny preview decoders (:mod:`.taew`) over their shared causal cache
(:mod:`.decode_stream`), the VAE encoder (:mod:`.vae_encode`), Krea Realtime's context re-encoder
(:mod:`.reencode`) and the frames written while the DiT goes on (:mod:`.frames`). Imports
:mod:`cascade_core.sampling` (its events), :mod:`cascade_core.weights` and :mod:`cascade_core.common`."""
