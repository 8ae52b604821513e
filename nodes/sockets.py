"""The pack's own socket types and shared schema constants."""
from comfy_api.latest import io

CATEGORY = "video/block cascade"

EngineModelType = io.Custom("BLOCK_CASCADE_MODEL")
ConfigType = io.Custom("BLOCK_CASCADE_CONFIG")
ScheduleType = io.Custom("BLOCK_CASCADE_PROMPT_SCHEDULE")
DecoderType = io.Custom("BLOCK_CASCADE_DECODER")  # a decoder file core VAELoader cannot load

EMBEDS_FOLDER = "prompt_embeds"


def register_folders() -> None:
    """models/prompt_embeds: precomputed [L, 4096] prompt embeddings (.safetensors); and ``.gguf`` files listed in
    diffusion_models (models/diffusion_models and models/unet), as ComfyUI-GGUF lists them (a set of their
    own: the extension set ComfyUI shares between folders is left as it is)."""
    import os

    import folder_paths

    if EMBEDS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[EMBEDS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, EMBEDS_FOLDER)], {".safetensors"})
    paths, extensions = folder_paths.folder_names_and_paths["diffusion_models"]
    if ".gguf" not in extensions:
        folder_paths.folder_names_and_paths["diffusion_models"] = (paths, set(extensions) | {".gguf"})
