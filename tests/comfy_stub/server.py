"""Stand-in for ComfyUI's server.PromptServer: records send_sync(event, data, sid)."""


class PromptServer:
    instance = None

    def __init__(self):
        self.client_id = "client-1"
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))
