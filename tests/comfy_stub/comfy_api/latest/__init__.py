"""Stand-in for comfy_api.latest: ComfyExtension, io, ui."""
from abc import ABC, abstractmethod

from . import io, ui  # noqa: F401


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        pass

    @abstractmethod
    async def get_node_list(self) -> list:
        ...
