"""The MP4 an endless sampler run writes into ComfyUI's output folder while it streams.

Guarantees: the file is named as ComfyUI's own save nodes name theirs (``folder_paths.
get_save_image_path``: ``block_cascade/stream_00001_.mp4``, the counter past the files already there)
and written by :class:`cascade_core.video.frames.VideoWriter`, fragmented and flushed as it goes, so
Cancel, a crash or a killed server leave a playable file; :meth:`Recording.ui` is the node's UI output that
names it (``{"block_cascade_video": [file]}``: in the prompt's history, where API clients find it, but not under
a key the frontend draws a preview of below the node: the sampler's widget links the video inside the node).
"""
from __future__ import annotations

import os

from cascade_core.video.frames import VideoWriter

PREFIX = "block_cascade/stream"
UI_KEY = "block_cascade_video"  # the node's UI output naming the MP4 (see the module docstring)


class Recording(VideoWriter):
    """An MP4 at the next free ``PREFIX`` name in ComfyUI's output folder (the folder made if needed), playing at
    ``fps`` frames per second (the run's latent space's, :attr:`LatentSpace.fps`)."""

    def __init__(self, fps: int):
        import folder_paths

        out = folder_paths.get_output_directory()
        folder, name, counter, self.subfolder, _ = folder_paths.get_save_image_path(PREFIX, out)
        self.filename = f"{name}_{counter:05}_.mp4"
        super().__init__(os.path.join(folder, self.filename), fps=fps)

    def file(self) -> dict:
        """The file as ComfyUI's UI outputs and ``/view`` name it."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": "output"}

    def ui(self) -> dict:
        return {UI_KEY: [self.file()]}
