"""ComfyUI glue of Block Cascade: node schemas, type conversion, progress and widget events.

Imported relatively by the pack's root ``__init__`` (ComfyUI has its own top-level ``nodes`` module);
the engine is imported by its own name, ``cascade_core``.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import live_input  # noqa: F401  (adds POST /block_cascade/webcam/{node} to ComfyUI's server)
from .config import BlockCascadeConfig, BlockCascadePromptSchedule
from .decoders import BlockCascadeDecoderLoader
from .loaders import BlockCascadeEmbedsLoader, BlockCascadeFromModel, BlockCascadeModelLoader
from .sampler import BlockCascadeSampler
from .sockets import register_folders
from .v2v import BlockCascadeVideoToVideo

NODES: list[type[io.ComfyNode]] = [
    BlockCascadeModelLoader,
    BlockCascadeFromModel,
    BlockCascadeConfig,
    BlockCascadePromptSchedule,
    BlockCascadeEmbedsLoader,
    BlockCascadeDecoderLoader,
    BlockCascadeSampler,
    BlockCascadeVideoToVideo,
]


class BlockCascadeExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_folders()
        return list(NODES)
