"""Load the pack the way ComfyUI loads a custom node folder (tests only).

ComfyUI imports ``custom_nodes/<folder>/__init__.py`` under a module name derived from the folder's
path (dots replaced), calls ``comfy_entrypoint()`` and asks the extension for its node list.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def use_stub() -> None:
    """Put this stand-in first on sys.path (before anything imports comfy_api, folder_paths, ...)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)


def load_pack(pack_dir: str):
    """-> (the pack's root module, {node_id: node class})."""
    use_stub()
    name = os.path.abspath(pack_dir).replace(".", "_x_")
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    async def nodes():
        extension = await module.comfy_entrypoint()
        await extension.on_load()
        return await extension.get_node_list()

    classes = asyncio.run(nodes())
    return module, {cls.GET_SCHEMA().node_id: cls for cls in classes}
