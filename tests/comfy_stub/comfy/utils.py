"""Stand-in for comfy.utils: ProgressBar (calls PROGRESS_BAR_HOOK(value, total, preview, node_id=...)) and
common_upscale for images [B, C, H, W] with torch's own resampling modes."""
import torch.nn.functional as F

PROGRESS_BAR_HOOK = None


def common_upscale(samples, width, height, upscale_method, crop):
    """[B, C, H, W] -> [B, C, height, width]. crop "center": first the centred part of the target's
    aspect ratio (the margin on each side rounded to whole pixels), then resized; else resized whole."""
    h, w = samples.shape[-2:]
    if crop == "center":
        if w * height > h * width:  # wider than the target: trim left and right
            side = round((w - h * width / height) / 2)
            samples = samples[..., :, side:w - side]
        elif w * height < h * width:
            side = round((h - w * height / width) / 2)
            samples = samples[..., side:h - side, :]
    return F.interpolate(samples, size=(height, width), mode=upscale_method)


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
