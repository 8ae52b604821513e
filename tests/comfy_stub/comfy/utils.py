"""Stand-in for comfy.utils.ProgressBar: calls PROGRESS_BAR_HOOK(value, total, preview, node_id=...)."""
PROGRESS_BAR_HOOK = None


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id, self.hook = total, 0, node_id, PROGRESS_BAR_HOOK

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
