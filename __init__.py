"""Block Cascade: real-time streaming text-to-video for block-causal Wan2.1 models in ComfyUI.

ComfyUI imports this folder under a name derived from its path, and its own top-level module is
called ``nodes``; so the engine is made importable under its own stable name (``cascade_core``, by
putting this folder on ``sys.path``) and the glue package is imported relatively. Nothing heavy is
imported here: the nodes load when ComfyUI calls :func:`comfy_entrypoint`.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import BlockCascadeExtension

    return BlockCascadeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
