"""``python -m cascade_core generate|decode``: text-, image- and video-to-video with block-causal Wan2.1 and Wan2.2
models from the command line, and latents into a video (:data:`DESCRIPTION` is what ``--help`` says).

Without ``--checkpoint`` a small built-in model with random weights runs (labelled untrained in the
summary), so the command works on any machine. ``--checkpoint`` reads any Wan2.1 T2V DiT layout, LongLive 2.0's
Wan2.2-TI2V-5B DiT and a causal Wan2.2-A14B two-expert folder (:mod:`weights.checkpoint`), ``--lora`` merges a
LoRA into it, ``--prompt`` embeds a text with a local umt5-xxl encoder (:mod:`weights.text`). ``decode`` turns latents that ``generate --latents-out`` wrote into an MP4
and/or PNGs. Bad arguments print one line and exit with code 2 (checked before any model work, see
:mod:`cli.checks`); Ctrl-C stops with one line and exit code 130 (:mod:`cli.run`). Progress goes to
stderr, one JSON summary line to stdout.
"""
from __future__ import annotations

import argparse

from ..common.constants import DTYPES
from ..model import attention
from ..model.compiling import COMPILE_CHOICES
from ..model.fp8 import WEIGHT_DTYPES
from ..model.kv_store import KV_DTYPES
from ..sampling.config import ATTENTION_MODES, FLASHBLOCK_MODES, SWITCH_MODES
from ..sampling.families import FAMILIES
from ..weights.checkpoint import EMA_MODES
from .checks import UsageError, seed_value

DESCRIPTION = ("Block-causal video generation from the command line: text-to-video, image-to-video (--image) and "
               "video-to-video (--video-in) with Wan2.1 and Wan2.2 models (generate), and latents into a video "
               "(decode).")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help text with each option's default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:  # no value, a switch, a list
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block
        raise UsageError(message)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def int_list_or_none(text: str) -> tuple[int, ...] | str:
    """argparse type: comma-separated integers, or "none" (kept as the word, read by the checks)."""
    return "none" if text.strip().lower() == "none" else int_list(text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m cascade_core", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    g = sub.add_parser("generate", help="generate latent video", formatter_class=Formatter,
                       description="Generate latents [1, C, T, H/s, W/s] (optionally decoded into a video; C, s: "
                                   "the model's latent space, 16 and 8 for Wan2.1, 48 and 16 for Wan2.2).")
    g.add_argument("--checkpoint", help="Wan2.1 T2V DiT weights: .safetensors (ComfyUI, diffusers, fp8), a "
                                        "ComfyUI-GGUF .gguf, a training .pt (read with weights_only) or a "
                                        "diffusers/Wan folder; a Wan2.2 A14B diffusers folder with transformer/ "
                                        "(high-noise) and transformer_2/ (low-noise) runs the two experts")
    g.add_argument("--ema", choices=EMA_MODES, default="auto",
                   help="EMA weights of a training checkpoint (auto: when present and no --lora)")
    g.add_argument("--lora", help="LoRA merged into --checkpoint at load (LongLive, peft, kohya, ComfyUI or diffusers keys)")
    g.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--embeds", help=".safetensors holding one [L, 4096] prompt embedding (random if absent)")
    text.add_argument("--prompt", help="prompt text, embedded with --text-encoder")
    g.add_argument("--text-encoder", help="umt5-xxl encoder weights (ComfyUI text_encoders/umt5_xxl_*.safetensors, "
                                          "Wan's models_t5_umt5-xxl-enc-bf16.pth, or a diffusers repository's "
                                          "text_encoder/ folder of sharded model*.safetensors)")
    g.add_argument("--tokenizer", help="local umt5-xxl tokenizer folder (optional when the encoder file "
                                       "carries its tokenizer, as ComfyUI's do)")
    g.add_argument("--width", type=int, default=832, help="video width in pixels, a multiple of 16 (32 for a Wan2.2 "
                                                          "model: LongLive 2.0, 16 pixels a latent pixel)")
    g.add_argument("--height", type=int, default=480, help="video height in pixels, a multiple of 16 (32 for a "
                                                           "Wan2.2 model)")
    g.add_argument("--blocks", type=int, default=7,
                   help="latent blocks (7 x 3 latent frames = 81 video frames); 0 = endless, until Ctrl-C (needs a "
                        "window; the MP4 is written as it goes and finalised at the end)")
    g.add_argument("--family", choices=FAMILIES,
                   help="checkpoint family: fills every sampling setting below from its reference inference "
                        "code (default: read off the --checkpoint/--lora path where it says, else longlive-2 for a "
                        "Wan2.2 TI2V-5B DiT, causal-wan2.2-a14b for a two-expert folder, self-forcing otherwise); "
                        "explicit settings override it")
    g.add_argument("--frames-per-block", type=int,
                   help="latent frames per block (3: chunk-wise checkpoints, 1: frame-wise; family default)")
    g.add_argument("--independent-first-frame", action=argparse.BooleanOptionalAction, default=None,
                   help="block 0 is one latent frame, later blocks --frames-per-block (--blocks counts block 0)")
    g.add_argument("--steps", type=int_list, help="denoising step list, 0..1000 (family default; 1000,750,500,250; "
                                                  "Krea Realtime 1000,750,500,250,0)")
    g.add_argument("--first-block-steps", type=int_list_or_none,
                   help="block 0's own step list (Causal Forcing++ 1- and 2-step models: 1000,750,500,250); "
                        "none: block 0 takes --steps")
    g.add_argument("--warp", choices=("on", "off"),
                   help="read the step list through the shifted sigma table (on: Self-Forcing, LongLive) or use "
                        "it as the timesteps (off: CausVid)")
    g.add_argument("--shift", type=float, help="flow-matching timestep shift (family default; 5, CausVid 8)")
    g.add_argument("--context-noise", type=float, help="timestep of the clean pass, and of Krea Realtime's context "
                                                       "rebuild (family default; 0)")
    g.add_argument("--parallel", type=int, help="blocks in flight, 1..steps+1 (family default: 1; Rolling Forcing "
                                                "denoises steps + 1 at once)")
    g.add_argument("--attention", choices=ATTENTION_MODES,
                   help="what an in-flight block sees of newer ones (family default: causal; Rolling Forcing "
                        "bidirectional)")
    g.add_argument("--window", type=int, help="latent frames attended, sink and own block included; 0 = all "
                                              "(family default; LongLive 12, Reward Forcing 9)")
    g.add_argument("--sink", type=int, help="first latent frames the --window always keeps (family default; "
                                            "LongLive 3, Reward Forcing 3 as an EMA sink)")
    g.add_argument("--switch", action="append", default=[], metavar="BLOCK[~N]:FILE|TEXT",
                   help="switch the prompt at a block: a .safetensors [L, 4096] embedding, or a text (embedded "
                        "with --text-encoder); BLOCK~N blends the old and new prompts over N blocks (0..64; "
                        "Krea's demo blends over 4); repeatable")
    g.add_argument("--switch-mode", choices=SWITCH_MODES,
                   help="none: in-flight blocks take the new prompt at their next step, no extra forward (Block "
                        "Cascading); recache: the window's committed K/V are recomputed under the new prompt, one "
                        "forward per switch (LongLive). Family default")
    g.add_argument("--kv-recompute", type=int, metavar="K",
                   help="rebuild the KV cache before every block from K clean context frames, the first re-encoded "
                        "by the VAE (needs --vae from the third block on), with no clean passes; 0 = off (default: the "
                        "family's: 3 for krea-realtime, else 0)")
    g.add_argument("--flashblock", choices=FLASHBLOCK_MODES, default="off",
                   help="FlashBlock: reuse block-external attention across a block's steps (reuse, approximate), "
                        "or split and merge at every step (exact: equal to off up to float rounding)")
    g.add_argument("--kv-dtype", choices=KV_DTYPES, default="default",
                   help="KV cache storage: default (the model's dtype) or fp8 (e4m3 with a scale per token and head: "
                        "about half the cache's memory, approximate; see BENCHMARKS.md for its deviation)")
    g.add_argument("--fold-clean", action="store_true",
                   help="P1: run each clean pass in the next block's first forward (the same result up to float "
                        "rounding, one forward fewer per block)")
    g.add_argument("--seed", type=seed_value, default=0, help="random seed, 0..2^64-1 (noise and re-noising)")
    g.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT weights and activations")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when present)")
    g.add_argument("--devices", help="several devices sharing the KV pool, one worker process each: "
                                     "cuda:0,cuda:1,... (NCCL) or cpu,cpu (gloo); torchrun: the ranks torchrun "
                                     "started (several machines; see the README)")
    g.add_argument("--attention-backend", choices=attention.BACKENDS, default="auto",
                   help="attention kernel (auto: the fastest on CUDA, torch's choice elsewhere); flash4 and "
                        "xformers need their optional packages (pip install flash-attn-4 / xformers); refused "
                        "where the device lacks it")
    g.add_argument("--weight-dtype", choices=tuple(WEIGHT_DTYPES), default="default",
                   help="storage of the transformer blocks' weights, as ComfyUI's UNETLoader: default keeps an fp8 "
                        "file fp8 (fp8 products where the GPU has fp8 units) and a GGUF file quantised, other files "
                        "in --dtype; fp8_e4m3fn and fp8_e5m2 store them fp8 (one byte a weight), widened per layer "
                        "for its product; fp8_e4m3fn_fast multiplies in fp8 (faster on GPUs with fp8 units; "
                        "approximate)")
    g.add_argument("--fp8", action="store_true", help="the same as --weight-dtype fp8_e4m3fn_fast")
    g.add_argument("--swap-blocks", type=int, default=-1, metavar="N",
                   help="keep the last N transformer blocks' weights in CPU memory, streamed to the GPU as the "
                        "forward reaches them (-1, the default: as few as fit the GPU's free memory; 0: none); two "
                        "experts: N of each expert's, all of them keeping the idle expert off the GPU")
    g.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the layers (auto: on CUDA where Triton is installed); the first run of a "
                        "video size pays the compilation (torch keeps it on disk for later processes)")
    g.add_argument("--noise", help=".safetensors with the initial noise [1, C, T, H/s, W/s] (the generated frames; C, "
                                   "s: the model's latents, 16 and 8 for Wan2.1, 48 and 16 for Wan2.2: LongLive 2.0)")
    g.add_argument("--video-in", metavar="FILE",
                   help="video-to-video as StreamDiffusionV2 does it (--family streamdiffusionv2): a video file "
                        "(encoded with --vae, resized to --width x --height, the aspect ratio not kept) or raw latents "
                        "[1, 16, T, H/8, W/8] in a .safetensors (their size is the video's); the length is the "
                        "input's ((frames - 1) // 4 chunks; --blocks is not used)")
    g.add_argument("--noise-scale", type=float,
                   help="with --video-in: the first chunk's share of noise, 0.201..1 (StreamDiffusionV2's sequential "
                        "script: 0.7; later chunks adapt to the motion; below 0.201 their first timestep can fall "
                        "to 0)")
    before = g.add_mutually_exclusive_group()
    before.add_argument("--image", metavar="FILE",
                        help="start image (PNG, JPEG; needs --vae): scaled to cover --width x --height keeping its "
                             "aspect ratio, then centre-cropped, and encoded into one latent frame before block 0; "
                             "the outputs hold that frame, then the --blocks generated blocks (LongLive 2.0, "
                             "--family longlive-2: the frame is block 0's frame 0, held in every step)")
    before.add_argument("--continue", dest="continue_from", metavar="FILE",
                        help="continue a video: latents that --latents-out wrote (.safetensors; the outputs hold "
                             "every given latent frame, then the new ones, so runs chain) or a video file such as "
                             "an MP4 (needs --vae; its last frames, scaled and cropped as --image, are encoded and "
                             "the outputs hold them, then the new ones); its last --context-frames latent frames "
                             "are the context before block 0")
    g.add_argument("--context-frames", type=int, default=0,
                   help="latent frames of --continue that are the context (0: the --window, or every frame "
                        "without one)")
    g.add_argument("--latents-out", help="write the latents [1, C, T, H/s, W/s] to this .safetensors (the model's "
                                         "latent space: see the description)")
    g.add_argument("--vae", help="a decoder of the model's latents: Wan2.1 VAE (file, or diffusers vae/ folder), "
                                 "LightVAE (lightvaew2_1) or a tiny decoder (taew2_1, LightTAE lighttaew2_1); for a "
                                 "Wan2.2 model (LongLive 2.0) the Wan2.2 VAE or taew2_2: decode each block as it "
                                 "finishes, on its own CUDA stream; the complete VAE's encoder encodes --image and a "
                                 "--continue video")
    g.add_argument("--decode-device", default="auto",
                   help="where --vae and --preview-vae decode: auto (the run's device; with several --devices the "
                        "last of them) or a device such as cuda:2 (a GPU of its own) or cpu")
    g.add_argument("--video-out", help="MP4 to write (with --vae; default: out/video.mp4 unless --frames-dir)")
    g.add_argument("--frames-dir", help="write each frame as a PNG into this folder as it is decoded (alone: no MP4)")
    g.add_argument("--preview-vae", metavar="FILE",
                   help="a second, fast decoder (taew2_1, LightTAE) for a live preview beside --vae (needed; it "
                        "writes the video): each block decoded by both, each on its own CUDA stream")
    g.add_argument("--preview-out", metavar="FILE.mp4",
                   help="the preview's MP4, written as it grows (every frame flushed: a player opening it during "
                        "the run plays what is there; default: beside the video, out/video.preview.mp4)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    d = sub.add_parser("decode", help="decode latents into a video", formatter_class=Formatter,
                       description="Decode latents that generate --latents-out wrote into an MP4 and/or PNGs.")
    d.add_argument("--latents", required=True, help=".safetensors holding latents [1, C, T, H/s, W/s] of --vae's "
                                                    "latent space (Wan2.1: 16 and 8, Wan2.2: 48 and 16)")
    d.add_argument("--vae", required=True, help="Wan2.1 VAE (file, or diffusers vae/ folder), LightVAE "
                                                "(lightvaew2_1) or a tiny decoder (taew2_1, LightTAE); the Wan2.2 "
                                                "VAE or taew2_2 for Wan2.2 latents")
    d.add_argument("--video-out", help="MP4 to write (default: out/video.mp4 unless --frames-dir)")
    d.add_argument("--frames-dir", help="write each frame as a PNG into this folder (alone: no MP4)")
    d.add_argument("--frames-per-pass", type=positive_int, default=3,
                   help="latent frames decoded at once, 1 or more (memory)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when present)")
    return p
