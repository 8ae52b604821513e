"""The pack's HTTP routes on ComfyUI's own aiohttp server (added when the pack is imported inside it)."""
from __future__ import annotations

from typing import Callable


def add_route(method: str, path: str, handler: Callable) -> bool:
    """Add ``method path`` -> ``handler`` to ComfyUI's running server (PromptServer.instance.routes),
    once however often it is called. Returns whether a server takes it now (False outside ComfyUI)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:
        return False
    if not any(getattr(r, "path", None) == path and getattr(r, "method", None) == method for r in routes):
        getattr(routes, method.lower())(path)(handler)
    return True
