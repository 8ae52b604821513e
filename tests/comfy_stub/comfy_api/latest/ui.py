"""Stand-in for comfy_api.latest.ui (the pack sends its previews as events, not UI outputs)."""
