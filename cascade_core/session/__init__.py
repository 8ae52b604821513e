"""One run as every frontend drives it (:mod:`.run_session`): the command line and the ComfyUI sampler node
both go through :class:`~.run_session.RunSession`'s named steps (plan, memory, run, close), and keep only what
is their own: reading their inputs, showing frames, their outputs. Imports the sub-packages before it in
cascade_core's order (the frontends cli and the nodes import it)."""
from .run_session import RunSession

__all__ = ["RunSession"]
