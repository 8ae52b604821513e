"""The headless client's I/O: ComfyUI's HTTP API and the progress bar on stderr. Standard library plus
tqdm; never imports ComfyUI."""
from __future__ import annotations

import json
import re
import sys
import urllib.request

from tqdm import tqdm


class Server:
    """ComfyUI's HTTP API at ``address`` (``host:port`` or a URL); ``timeout`` in seconds per request."""

    def __init__(self, address: str, timeout: float = 30.0):
        address = address.rstrip("/")
        if "://" not in address:
            address = "http://" + address
        self.http = address
        self.ws = re.sub(r"^http", "ws", address)
        self.timeout = timeout

    def request(self, path: str, body=None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return r.read()

    def json(self, path: str, body=None):
        return json.loads(self.request(path, body))


class ProgressBar:
    """ComfyUI's per-node progress as a tqdm bar on stderr: a new bar whenever the node (or its step
    count) changes; ``note`` prints a line above it."""

    def __init__(self, stream=None):
        self.out = stream or sys.stderr
        self.bar, self.key = None, None

    def update(self, value: float, maximum: float | None, label: str = ""):
        """Show ``value`` of ``maximum`` (None: a counter without a total) for ``label``."""
        if (label, maximum) != self.key:
            self.close()
            self.bar = tqdm(total=maximum, desc=label or None, file=self.out, leave=True, dynamic_ncols=True)
            self.key = (label, maximum)
        self.bar.n = value
        self.bar.refresh()

    def note(self, text: str):
        tqdm.write(text, file=self.out)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None
