"""encode_prompts / --prompt: a tiny umt5 encoder and tokenizer made here give the embeddings of a direct call.

Nothing is downloaded: the tokenizer is built from a handful of words (a WordLevel tokenizer saved as a
PreTrainedTokenizerFast folder, and a sentencepiece model trained on a few sentences).
"""
import io
import json

import pytest
import torch

from cascade_core.common.constants import TEXT_TOKENS

transformers = pytest.importorskip("transformers")

from cascade_core.cli.command import main  # noqa: E402
from cascade_core.model.dit import WanConfig, WanModel  # noqa: E402
from cascade_core.weights.safe_io import CheckpointError, read_tensor_file, save_safetensors  # noqa: E402
from cascade_core.weights.text import TextEncoder, clean, encode_prompts  # noqa: E402

D_MODEL = 32
SENTENCES = ["a cat walks on the beach at sunset", "a dog runs through the snow", "waves crash on dark rocks",
             "the city at night with neon lights", "a red car drives fast on a mountain road"]
WORDS = sorted({w for s in SENTENCES for w in s.split()} | {"&", "fish"})
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--steps", "1000,500", "--quiet", "--dtype", "fp32",
         "--device", "cpu", "--compile", "off"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny umt5 encoder (HF model + its weights in several files) and a tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    d = tmp_path_factory.mktemp("text")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(d / "tokenizer"))

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=64, d_model=D_MODEL, d_kv=8, num_heads=4, num_layers=2, d_ff=48,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_safetensors(sd, str(d / "umt5.safetensors"))
    return {"dir": d, "model": model, "tokenizer": str(d / "tokenizer"), "fast": fast, "sd": sd,
            "encoder": str(d / "umt5.safetensors")}


def direct(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_same_embeddings_as_calling_the_encoder_directly(files):
    texts = ["a cat walks on the beach", "waves crash on dark rocks at night with neon lights fish"]
    got = encode_prompts(texts, text_encoder=files["encoder"], tokenizer=files["tokenizer"], dtype=torch.float32)
    for text, emb in zip(texts, got):
        ids = files["fast"](text)["input_ids"]
        assert ids[-1] == 1  # the end-of-sequence token is part of the prompt, as in the reference
        assert emb.shape == (len(ids), D_MODEL) and emb.dtype == torch.float32
        assert torch.allclose(emb, direct(files["model"], ids), atol=1e-5)  # padding of the batch removed
    one = encode_prompts([texts[0]], text_encoder=files["encoder"], tokenizer=files["tokenizer"], dtype=torch.float32)
    assert torch.equal(one[0], direct(files["model"], files["fast"](texts[0])["input_ids"]))
    assert not torch.allclose(got[0][:3], got[1][:3])


def test_cleaning_and_truncation(files):
    enc = TextEncoder.load(files["encoder"], files["tokenizer"], dtype=torch.float32)
    assert clean("  a  cat &amp;amp;\n\tfish ") == "a cat & fish"
    a, b = enc(["  a   cat &amp;amp; fish\n"]), enc(["a cat & fish"])
    assert torch.equal(a[0], b[0])
    long = enc([" ".join(["fish"] * 700)])[0]
    assert long.shape == (TEXT_TOKENS, D_MODEL)
    assert "umt5 encoder (d_model 32, 2 layers, 4 heads, d_ff 48, vocab 64" in enc.description


def fp8_scaled(sd):
    stored, exact = {}, {}
    for k, v in sd.items():
        if v.dim() == 2 and k != "shared.weight" and "relative_attention_bias" not in k:
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            stored[k], stored[k[: -len(".weight")] + ".scale_weight"] = q, scale.reshape(())
            exact[k] = q.float() * scale
        else:
            stored[k] = exact[k] = v
    stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return stored, exact


def wan_release_names(sd):
    """HF names -> the names of Wan's models_t5_umt5-xxl-enc-bf16.pth."""
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(2):
        b = f"encoder.block.{i}."
        out.update({f"blocks.{i}.norm1.weight": sd[b + "layer.0.layer_norm.weight"],
                    f"blocks.{i}.pos_embedding.embedding.weight":
                        sd[b + "layer.0.SelfAttention.relative_attention_bias.weight"],
                    f"blocks.{i}.norm2.weight": sd[b + "layer.1.layer_norm.weight"],
                    f"blocks.{i}.ffn.gate.0.weight": sd[b + "layer.1.DenseReluDense.wi_0.weight"],
                    f"blocks.{i}.ffn.fc1.weight": sd[b + "layer.1.DenseReluDense.wi_1.weight"],
                    f"blocks.{i}.ffn.fc2.weight": sd[b + "layer.1.DenseReluDense.wo.weight"]})
        for p in "qkvo":
            out[f"blocks.{i}.attn.{p}.weight"] = sd[b + f"layer.0.SelfAttention.{p}.weight"]
    return out


def test_comfyui_fp8_scaled_prefixed_and_wan_release_files(files):
    from transformers import UMT5EncoderModel

    d, sd = files["dir"], files["sd"]
    text = "a dog runs on the beach"
    ids = files["fast"](text)["input_ids"]
    want = direct(files["model"], ids)
    save_safetensors({"text_encoders.umt5xxl.transformer." + k: v.bfloat16() for k, v in sd.items()},
                     str(d / "bf16.safetensors"))
    torch.save(wan_release_names(sd), str(d / "models_t5_umt5-xxl-enc-bf16.pth"))
    got = encode_prompts([text], str(d / "models_t5_umt5-xxl-enc-bf16.pth"), files["tokenizer"], dtype=torch.float32)
    assert torch.equal(got[0], want)
    got = encode_prompts([text], str(d / "bf16.safetensors"), files["tokenizer"], dtype=torch.float32)
    assert torch.allclose(got[0], want, atol=0.05) and not torch.equal(got[0], want)  # bf16 rounding

    stored, exact = fp8_scaled(sd)
    save_safetensors(stored, str(d / "umt5_fp8_scaled.safetensors"))
    enc = TextEncoder.load(str(d / "umt5_fp8_scaled.safetensors"), files["tokenizer"], dtype=torch.float32)
    assert "fp8 e4m3fn scaled" in enc.description
    model = UMT5EncoderModel(files["model"].config).eval()
    model.load_state_dict(dict(exact, **{"encoder.embed_tokens.weight": exact["shared.weight"]}))
    assert torch.equal(enc([text])[0], direct(model, ids))


def test_tokenizer_carried_by_the_encoder_file(files):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    path = str(files["dir"] / "with_spiece.safetensors")
    save_safetensors(dict(files["sd"], spiece_model=torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)),
                     path)
    text = "a cat on the snow"
    got = encode_prompts([text], path, dtype=torch.float32)[0]  # no tokenizer folder needed
    ids = sp.encode(text) + [1]
    assert torch.equal(got, direct(files["model"], ids))
    with pytest.raises(CheckpointError, match="umt5.safetensors: carries no tokenizer"):
        encode_prompts([text], files["encoder"])


def test_bad_text_encoder_files(files, tmp_path):
    sd = files["sd"]
    t5 = {k: v for k, v in sd.items() if not ("block.1" in k and "relative_attention_bias" in k)}
    save_safetensors(t5, str(tmp_path / "t5xxl.safetensors"))
    with pytest.raises(CheckpointError, match="t5xxl.safetensors: a T5 encoder with one shared position bias"):
        encode_prompts(["a cat"], str(tmp_path / "t5xxl.safetensors"), files["tokenizer"])
    dit = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)).state_dict()
    save_safetensors(dit, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="dit.safetensors: not a umt5 text encoder: it looks like a Wan DiT"):
        encode_prompts(["a cat"], str(tmp_path / "dit.safetensors"), files["tokenizer"])
    save_safetensors({"encoder.conv1.weight": torch.zeros(2, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a umt5 text encoder: it looks like a VAE"):
        encode_prompts(["a cat"], str(tmp_path / "vae.safetensors"), files["tokenizer"])
    wide = dict(sd, **{"encoder.block.1.layer.1.DenseReluDense.wo.weight": torch.zeros(32, 99)})
    save_safetensors(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="wide.safetensors: inconsistent shapes"):
        encode_prompts(["a cat"], str(tmp_path / "wide.safetensors"), files["tokenizer"])
    with pytest.raises(CheckpointError, match="no such tokenizer folder"):
        encode_prompts(["a cat"], files["encoder"], str(tmp_path / "nowhere"))
    (tmp_path / "junk_tokenizer").mkdir()
    (tmp_path / "junk_tokenizer" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Nope"}))
    with pytest.raises(CheckpointError, match="junk_tokenizer: not a usable tokenizer folder"):
        encode_prompts(["a cat"], files["encoder"], str(tmp_path / "junk_tokenizer"))


def test_cli_prompt_gives_the_direct_embeddings(files, tmp_path, capsys):
    dit = str(tmp_path / "dit.safetensors")
    save_safetensors(WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=D_MODEL),
                                     seed=2).state_dict(), dit)
    text = "a red car drives on a mountain road at sunset"
    ids = files["fast"](text)["input_ids"]
    save_safetensors({"embeds": direct(files["model"], ids)}, str(tmp_path / "embeds.safetensors"))
    outs = {}
    for name, extra in (("prompt", ["--prompt", text, "--text-encoder", files["encoder"],
                                    "--tokenizer", files["tokenizer"]]),
                        ("embeds", ["--embeds", str(tmp_path / "embeds.safetensors")]),
                        ("other", ["--prompt", "a dog", "--text-encoder", files["encoder"],
                                   "--tokenizer", files["tokenizer"]])):
        out = str(tmp_path / f"{name}.safetensors")
        assert main(["generate", *SMALL, "--checkpoint", dit, *extra, "--latents-out", out]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        outs[name] = read_tensor_file(out)["latents"]
        if name == "prompt":
            assert summary["prompt"] == f"{len(ids)} tokens"
    assert torch.equal(outs["prompt"], outs["embeds"])
    assert not torch.equal(outs["prompt"], outs["other"])


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a cat"], "--prompt needs --text-encoder FILE"),
    (["--prompt", "a cat", "--embeds", "e.safetensors"], "argument --embeds: not allowed with argument --prompt"),
    (["--text-encoder", "umt5.safetensors"], "--text-encoder and --tokenizer are used only with --prompt"),
    (["--prompt", "a cat", "--text-encoder", "missing.safetensors"], "missing.safetensors: no such file"),
])
def test_cli_prompt_errors_are_one_line(args, message, capsys):
    assert main(["generate", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_sharded_transformers_folder_loads_as_one(files, tmp_path):
    """A diffusers repository's text_encoder/: model-0000k-of-00002.safetensors and their index, as transformers'
    save_pretrained shards them: the same embeddings as the single file."""
    folder = tmp_path / "text_encoder"
    names = sorted(files["sd"])
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_safetensors({k: files["sd"][k] for k in keys}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    text = "a cat walks on the beach"
    one = encode_prompts([text], text_encoder=files["encoder"], tokenizer=files["tokenizer"], dtype=torch.float32)
    sharded = encode_prompts([text], text_encoder=str(folder), tokenizer=files["tokenizer"], dtype=torch.float32)
    assert torch.equal(one[0], sharded[0])
    (folder / "model.safetensors.index.json").unlink()  # no index: every model*.safetensors of the folder
    assert torch.equal(one[0], encode_prompts([text], text_encoder=str(folder), tokenizer=files["tokenizer"],
                                              dtype=torch.float32)[0])
