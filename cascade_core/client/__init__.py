"""The headless ComfyUI client, ``python -m cascade_core.client`` (:mod:`.headless`): it queues an
API-format workflow on a ComfyUI server over HTTP and watches it; :mod:`.steer` sends its ``--steer``
lines, :mod:`.http` holds its HTTP calls and progress bar, :mod:`.comfy_answers` reads ComfyUI's answers.
A frontend that talks to ComfyUI only over the network: of the engine it imports :mod:`cascade_core.common`
alone (no torch)."""
