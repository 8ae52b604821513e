"""Where the engine model and prompt embeddings come from."""
from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from cascade_core.common.constants import DTYPES, TEXT_TOKENS
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.fp8 import DROP_SUFFIXES, MARKER, SCALE_SUFFIXES, WEIGHT_DTYPES
from cascade_core.sampling.families import guess_family
from cascade_core.weights.safe_io import CheckpointError, read_tensor_file

from .experts import load_pair
from .sockets import CATEGORY, EMBEDS_FOLDER, EngineModelType, register_folders
from .values import CoreModel, FileModel

log = logging.getLogger("block_cascade")

EMA_CHOICES = ("auto", "ema", "base")


class BlockCascadeModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_folders()  # .gguf files in the list
        return io.Schema(
            node_id="BlockCascadeModelLoader",
            display_name="Load Causal Video Model",
            category=CATEGORY,
            description="Loads a block-causal Wan2.1 T2V DiT (Self-Forcing, CausVid, LongLive, Causal Forcing; "
                        "1.3B or 14B) or Wan2.2 TI2V-5B DiT (LongLive 2.0) from models/diffusion_models (or "
                        "models/unet): Self-Forcing .pt, ComfyUI or diffusers .safetensors, fp8 (kept fp8), "
                        "ComfyUI-GGUF .gguf (kept quantised). Pickles are read with weights_only. A file in the "
                        "transformer/ or transformer_2/ of a two-expert diffusers folder loads both experts (causal "
                        "Wan2.2 A14B).",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models")),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute precision (activations, and the weights outside the transformer "
                                       "blocks' fp8 layers)."),
                io.Combo.Input("ema", options=list(EMA_CHOICES), default="auto",
                               tooltip="Training checkpoints hold EMA and base weights: auto takes EMA when present."),
                io.Combo.Input("lora", options=["none", *folder_paths.get_filename_list("loras")], default="none",
                               tooltip="A LoRA merged into the weights at load (LongLive ships its model as base + "
                                       "LoRA; peft, kohya, ComfyUI and diffusers key names). For core LoRA nodes use "
                                       "Causal Model from MODEL."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the LoRA: 0 leaves the weights as they are, 0.5 adds half "
                                       "of its change, 1 all of it."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", optional=True,
                               tooltip="Storage of the transformer blocks' weights, as Load Diffusion Model: default "
                                       "keeps an fp8 file fp8 on the GPU (fp8 products on RTX 40xx and newer, "
                                       "widened per layer elsewhere); fp8_e4m3fn / fp8_e5m2 store a bf16 file as "
                                       "fp8 (half the memory); fp8_e4m3fn_fast also multiplies in fp8."),
            ],
            outputs=[EngineModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model_name, dtype, ema, lora="none", lora_strength=1.0, weight_dtype="default") -> io.NodeOutput:
        from cascade_core.weights.checkpoint import load_dit

        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        lora_path = None if lora in (None, "", "none") else folder_paths.get_full_path_or_raise("loras", lora)
        pair = load_pair(path, None, DTYPES[dtype], weight_dtype, lora=lora_path)
        if pair is not None:  # causal Wan2.2 A14B: a file of a two-expert folder (transformer/, transformer_2/)
            return io.NodeOutput(pair)
        sd, info = load_dit(path, dtype=DTYPES[dtype], ema=ema, lora=lora_path, lora_scale=lora_strength,
                            weight_dtype=weight_dtype)  # names and shapes checked
        model = WanModel.from_state_dict(sd, num_heads=info.num_heads, fast_fp8=info.fast_fp8)
        log.info("Block Cascade: %s", info.describe())
        loaded = FileModel(model, model_name, info.describe())
        loaded.family = guess_family(model_name, None if lora_path is None else lora)
        if loaded.family is not None:
            log.info("Block Cascade: %s looks like family %s (%s); a Config node with family auto uses its "
                     "settings", model_name, *loaded.family)
        return io.NodeOutput(loaded)


def expected_keys(cfg: WanConfig) -> set[str]:
    with torch.device("meta"):
        return set(WanModel(cfg).state_dict())


class BlockCascadeFromModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadeFromModel",
            display_name="Causal Model from MODEL",
            category=CATEGORY,
            description="Uses a core MODEL (e.g. from Load Diffusion Model, after LoRA nodes) as the causal "
                        "video model. ComfyUI loads and patches it first; its weights are shared, not copied.",
            inputs=[io.Model.Input("model", tooltip="A Wan2.1 T2V diffusion model, or a Wan2.2 TI2V-5B one (LongLive "
                                                    "2.0), of a block-causal checkpoint.")],
            outputs=[EngineModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        inner = getattr(model, "model", None)
        module = getattr(inner, "diffusion_model", None)
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"MODEL: expected a core diffusion MODEL (ModelPatcher), got {kind}")
        if any(t.dtype == torch.uint8 for t in module.state_dict().values()):
            raise ValueError("MODEL: its weights are quantised blocks (a GGUF loader's MODEL); load the .gguf file with "
                             "Load Causal Video Model, which keeps them quantised")
        keys = {k for k in module.state_dict() if not k.endswith(SCALE_SUFFIXES + DROP_SUFFIXES) and k != MARKER}
        try:
            cfg = WanConfig.from_state_dict(module.state_dict())
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"MODEL: {kind} is not a Wan2.1 T2V DiT nor Wan2.2's TI2V-5B (missing {exc})") from None
        extra = sorted(keys - expected_keys(cfg))
        missing = sorted(expected_keys(cfg) - keys)
        space = _latent_space(cfg)  # 16 latent channels in and out: Wan2.1's; 48: Wan2.2's (TI2V-5B, LongLive 2.0)
        if space is None or extra or missing:
            found = (f"input channels {cfg.in_dim}, output channels {cfg.out_dim}" if space is None else
                     f"unexpected parameters {', '.join(extra[:3])}" if extra else
                     f"missing parameters {', '.join(missing[:3])}")
            raise ValueError(f"MODEL: {kind} is not a Wan2.1 text-to-video DiT nor Wan2.2's TI2V-5B ({found}; "
                             f"image-to-video, VACE and Fun models are not supported)")
        log.info("Block Cascade: MODEL %s works in %s", kind, space.words())
        return io.NodeOutput(CoreModel(model, label=kind))


def _latent_space(cfg: WanConfig):
    """The DiT's latent space (:attr:`WanConfig.latent_space`), None where it has none of the known ones."""
    try:
        return cfg.latent_space
    except ValueError:
        return None


class BlockCascadeEmbedsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_folders()
        return io.Schema(
            node_id="BlockCascadeEmbedsLoader",
            display_name="Prompt Embeddings from File",
            category=CATEGORY,
            description="A precomputed umt5-xxl prompt embedding [L, 4096] (one tensor in a .safetensors under "
                        "models/prompt_embeds) as CONDITIONING, like the command line's --embeds.",
            inputs=[io.Combo.Input("embeds", options=folder_paths.get_filename_list(EMBEDS_FOLDER))],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, embeds) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(EMBEDS_FOLDER, embeds)
        if not path.lower().endswith(".safetensors"):
            raise CheckpointError(path, "prompt embeddings must be a .safetensors file")
        tensors = read_tensor_file(path)
        if len(tensors) != 1:
            raise CheckpointError(path, f"expected exactly one tensor [L, 4096], found {len(tensors)}: "
                                        f"{', '.join(list(tensors)[:4])}")
        t = next(iter(tensors.values()))
        if t.dim() == 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2 or not t.is_floating_point() or not 1 <= t.shape[0] <= TEXT_TOKENS:
            raise CheckpointError(path, f"expected prompt embeddings [L, 4096] with L in 1..{TEXT_TOKENS}, "
                                        f"got {list(t.shape)} {t.dtype}")
        return io.NodeOutput([[t.float().unsqueeze(0).contiguous(), {}]])
