"""Latents to frames and back: the latent spaces (:mod:`.latents`), the streaming Wan2.1 and Wan2.2 VAE decoders
(:mod:`.vae`, :mod:`.vae22`) and the tiny preview decoders (:mod:`.taew`) over their shared causal cache
(:mod:`.decode_stream`), the VAE encoder (:mod:`.vae_encode`), Krea Realtime's context re-encoder
(:mod:`.reencode`), the frames written while the DiT goes on (:mod:`.frames`), and the pixel frames a
video-to-video run reads: what every source shares (:mod:`.frame_source`: the FrameSource protocol, the resize),
the live inputs (:mod:`.live_sources`: the webcam's pushed frames and HTTP MJPEG streams, read part by part by
:mod:`.multipart`, through a newest-kept buffer) and the finite ones with the choice among all
(:mod:`.sources`: a video file, an IMAGE batch, a core VIDEO; open_source). Imports
:mod:`cascade_core.sampling` (its events), :mod:`cascade_core.weights` and :mod:`cascade_core.common`."""
