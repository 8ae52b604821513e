"""What every part of the engine shares and nothing else: the constants of the Wan2.1 latent space and
its text context (:mod:`.constants`), the one-line messages of errors (:mod:`.messages`), copies between
host and device that never make the host wait (:mod:`.transfer`) and Ctrl-C as a request to stop
(:mod:`.stop`). Imports nothing of the engine."""
