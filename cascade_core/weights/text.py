"""Prompt embeddings from a local umt5-xxl text encoder (the encoder Wan2.1 is conditioned on).

Guarantees:
- Nothing is fetched from a hub: the weights come from one local file, the tokenizer from a local
  folder (``AutoTokenizer.from_pretrained(dir, local_files_only=True)``) or from the sentencepiece
  model that ComfyUI text-encoder files carry (``spiece_model``).
- Weights are read only through :mod:`weights.safe_io` (no pickled code runs). Accepted files: ComfyUI /
  Hugging Face names (``encoder.block.N.layer...``, ``shared.weight``, with or without a prefix), in
  fp32 / fp16 / bf16 or fp8 (``scaled_fp8`` with ``.scale_weight``), and the original Wan release
  file (``models_t5_umt5-xxl-enc-bf16.pth``: ``token_embedding``, ``blocks.N.attn`` ...).
- The model is ``transformers``' ``UMT5EncoderModel`` with the configuration read off the weights
  (umt5-xxl: d_model 4096, 24 layers, 64 heads, d_kv 64, d_ff 10240, vocab 256384, gated GELU).
- Texts are cleaned as the Wan reference does (HTML entities, whitespace; ``ftfy`` when installed),
  tokenized with the end-of-sequence token, truncated to 512 tokens; each output is [L, d_model]
  for its L real tokens (padding removed). The DiT pads with zeros to 512, as the reference does.
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..common.constants import TEXT_TOKENS
from ..common.messages import first_keys
from .checkpoint import dequantize_state_dict
from .safe_io import CheckpointError, looks_like, read_weights

_ANCHOR = re.compile(r"^(.*?)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$")
_WAN_ANCHOR = re.compile(r"^(.*?)blocks\.0\.attn\.q\.weight$")


# ---- weights ---------------------------------------------------------------------------------

def _from_wan_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Wan T5 encoder's names -> Hugging Face T5 names."""
    per_block = {"norm1.weight": "layer.0.layer_norm.weight",
                 "attn.q.weight": "layer.0.SelfAttention.q.weight",
                 "attn.k.weight": "layer.0.SelfAttention.k.weight",
                 "attn.v.weight": "layer.0.SelfAttention.v.weight",
                 "attn.o.weight": "layer.0.SelfAttention.o.weight",
                 "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
                 "norm2.weight": "layer.1.layer_norm.weight",
                 "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # through the GELU
                 "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
                 "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k == "token_embedding.weight":
            out["shared.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        elif m and m.group(2) in per_block:
            out[f"encoder.block.{m.group(1)}.{per_block[m.group(2)]}"] = v
        else:
            out[k] = v  # reported as unexpected when the model is loaded
    return out


def read_umt5(path: str, dtype: torch.dtype = torch.bfloat16
              ) -> tuple[dict[str, torch.Tensor], dict, bytes | None, str]:
    """A umt5 encoder file, or a transformers folder of (sharded) ``model*.safetensors`` with its index (a
    diffusers repository's ``text_encoder/``) -> (HF-named state dict in ``dtype``, UMT5Config arguments,
    embedded sentencepiece model or None, one-line description)."""
    raw = read_weights(path)[0]
    if not isinstance(raw, dict) or not any(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(path, "holds no tensors where umt5 weights were expected")
    sd = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    spiece = sd.pop("spiece_model", None)
    layout = "comfyui/hf names"
    anchors = {m.group(1) for k in sd if (m := _ANCHOR.match(k))}
    if not anchors:
        wan = {m.group(1) for k in sd if (m := _WAN_ANCHOR.match(k))}
        if len(wan) == 1 and f"{next(iter(wan))}token_embedding.weight" in sd:
            prefix = next(iter(wan))
            sd = _from_wan_names({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
            anchors, layout = {""}, "Wan release names"
    if len(anchors) != 1:
        looks = looks_like(list(sd)) or f"{len(sd)} tensors with no T5 encoder names"
        raise CheckpointError(path, f"not a umt5 text encoder: it looks like {looks}" if len(anchors) == 0 else
                              f"holds several text encoders (prefixes {sorted(anchors)})")
    prefix = next(iter(anchors))
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.") and k != "lm_head.weight"}  # full T5 files
    sd, quant = dequantize_state_dict(sd, path, dtype)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "shared.weight" not in sd:
        raise CheckpointError(path, "missing keys: shared.weight (the token embedding)")
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    try:
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
        q = sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
        bias0 = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        vocab, d_model = sd["shared.weight"].shape
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, f"incomplete T5 encoder (missing {exc})") from None
    if layers > 1 and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in sd:
        raise CheckpointError(path, "a T5 encoder with one shared position bias (t5-xxl, as Flux uses), "
                                    "not umt5-xxl (a position bias in every layer), which Wan2.1 needs")
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in sd:
        raise CheckpointError(path, "a T5 encoder without gated feed-forward layers (T5 v1.0), not umt5-xxl")
    heads = bias0.shape[1]
    config = dict(vocab_size=vocab, d_model=d_model, d_kv=q.shape[0] // heads, num_heads=heads, num_layers=layers,
                  d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                  relative_attention_num_buckets=bias0.shape[0], relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    spiece_bytes = spiece.to(torch.uint8).numpy().tobytes() if spiece is not None else None
    desc = (f"{os.path.basename(path)}: umt5 encoder (d_model {d_model}, {layers} layers, {heads} heads, "
            f"d_ff {config['d_ff']}, vocab {vocab}; {layout}{', ' + quant if quant else ''})")
    return sd, config, spiece_bytes, desc


def build_umt5(sd: dict[str, torch.Tensor], config: dict, path: str, device: torch.device | str = "cpu"):
    """``transformers.UMT5EncoderModel`` holding ``sd`` (built on the meta device, then assigned)."""
    try:
        from transformers import UMT5Config, UMT5EncoderModel
    except ImportError:
        raise CheckpointError(path, "reading a text encoder needs the 'transformers' package "
                                    "(pip install transformers)") from None
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        parts = ([f"missing keys: {first_keys(missing)}"] if missing else []) + \
                ([f"unexpected keys: {first_keys(unexpected)}"] if unexpected else [])
        raise CheckpointError(path, "; ".join(parts))
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        line = next((s.strip() for s in str(exc).splitlines() if "size mismatch" in s), str(exc).splitlines()[0])
        raise CheckpointError(path, f"inconsistent shapes: {line}") from None
    return model.to(device).eval().requires_grad_(False)


# ---- tokenizer -------------------------------------------------------------------------------

def clean(text: str) -> str:
    """The reference's 'whitespace' cleaning: ftfy (when installed), HTML entities, runs of spaces."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(tokenizer: str | None, spiece: bytes | None, encoder_path: str) -> Callable[[str], list[int]]:
    """text -> token ids ending with the end-of-sequence token, at most TEXT_TOKENS."""
    if tokenizer is not None:
        if not os.path.isdir(tokenizer):
            raise CheckpointError(tokenizer, "no such tokenizer folder")
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except ImportError:
            raise CheckpointError(tokenizer, "loading a tokenizer needs the 'transformers' package") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(tokenizer, f"not a usable tokenizer folder ({first})") from None
        return lambda text: list(tok(text, add_special_tokens=True, truncation=True,
                                     max_length=TEXT_TOKENS)["input_ids"])
    if spiece is None:
        raise CheckpointError(encoder_path, "carries no tokenizer (spiece_model); give the umt5-xxl tokenizer folder")
    try:
        import sentencepiece
    except ImportError:
        raise CheckpointError(encoder_path, "its embedded tokenizer needs the 'sentencepiece' package") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(encoder_path, f"its embedded tokenizer (spiece_model) is corrupt ({exc})") from None
    eos = sp.eos_id()
    return lambda text: list(sp.encode(text))[: TEXT_TOKENS - 1] + [eos]


# ---- the encoder -----------------------------------------------------------------------------

@dataclass
class TextEncoder:
    model: torch.nn.Module
    tokenize: Callable[[str], list[int]]
    description: str

    @classmethod
    def load(cls, text_encoder: str, tokenizer: str | None = None, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.bfloat16) -> "TextEncoder":
        """Read the weights (and the tokenizer: a folder, else the file's own ``spiece_model``)."""
        text_encoder = os.fspath(text_encoder)
        sd, config, spiece, desc = read_umt5(text_encoder, dtype)
        tokenize = load_tokenizer(None if tokenizer is None else os.fspath(tokenizer), spiece, text_encoder)
        return cls(build_umt5(sd, config, text_encoder, device), tokenize, desc)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def __call__(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text -> [L, d_model] for its L real tokens (end-of-sequence included)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.tokenize(clean(t))[:TEXT_TOKENS] for t in texts]
        if any(len(i) == 0 for i in ids):
            raise ValueError("a prompt gave no tokens")
        longest = max(len(i) for i in ids)
        batch = torch.zeros(len(ids), longest, dtype=torch.long)
        mask = torch.zeros(len(ids), longest, dtype=torch.long)
        for row, i in enumerate(ids):
            batch[row, : len(i)] = torch.tensor(i)
            mask[row, : len(i)] = 1
        with torch.inference_mode():
            out = self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return [out[row, : len(i)].clone() for row, i in enumerate(ids)]


def encode_prompts(texts: Sequence[str], text_encoder: str, tokenizer: str | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Load the encoder, embed ``texts`` -> list of [L, 4096] (umt5-xxl), and let the encoder go."""
    return TextEncoder.load(text_encoder, tokenizer, device=device, dtype=dtype)(texts)
