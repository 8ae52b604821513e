"""The shipped workflows: UI format (workflows/*.json) and API format (workflows/api/*.json).

What this proves: every UI workflow has an API twin and vice versa; each UI file is a consistent
LiteGraph graph (links agree with the nodes' inputs and outputs, types match on both ends); twin and
UI hold the same nodes, the same links and the same widget values by name; every class_type is one
of ours or a core node of ComfyUI 0.3.64 listed below (as facts), every input name exists in that
node's schema and every required input is given; and each workflow is the one it claims to be.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "comfy_stub"))
os.environ.setdefault("BLOCK_CASCADE_TEST_ROOT", tempfile.mkdtemp(prefix="bc-comfy-"))

import execution  # noqa: E402  (the stand-in's queue-time validation)
from custom_node_loader import load_pack  # noqa: E402

PACK, OURS = load_pack(ROOT)
checks = sys.modules[f"{PACK.__name__}.nodes.checks"]
FILE_INPUTS = {"model_name", "lora", "embeds", "decoder_name"}  # combos listing model folders

# Core nodes of ComfyUI 0.3.64 that the workflows use (facts read from its nodes.py and
# comfy_extras/nodes_video.py): socket inputs {name: (type, optional)}, widget names in widget order
# (optional ones last), output types.
CORE = {
    "CLIPLoader": {"sockets": {}, "widgets": ["clip_name", "type", "device"], "optional": {"device"},
                   "outputs": ["CLIP"]},
    "CLIPTextEncode": {"sockets": {"clip": "CLIP"}, "widgets": ["text"], "optional": set(),
                       "outputs": ["CONDITIONING"]},
    "VAELoader": {"sockets": {}, "widgets": ["vae_name"], "optional": set(), "outputs": ["VAE"]},
    "CreateVideo": {"sockets": {"images": "IMAGE", "audio": "AUDIO"}, "widgets": ["fps"], "optional": {"audio"},
                    "outputs": ["VIDEO"]},
    "SaveVideo": {"sockets": {"video": "VIDEO"}, "widgets": ["filename_prefix", "format", "codec"],
                  "optional": set(), "outputs": []},
    # its image_upload option gives the frontend an "upload" widget, kept in the UI file, not in the API
    "LoadImage": {"sockets": {}, "widgets": ["image", "upload"], "optional": set(), "outputs": ["IMAGE", "MASK"]},
    # comfy_extras/nodes_video.py (0.3.64 and 0.27): its upload option (video) gives an "upload" widget too
    "LoadVideo": {"sockets": {}, "widgets": ["file", "upload"], "optional": set(), "outputs": ["VIDEO"]},
}
CLIP_TYPES_064 = {"stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
                  "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTES = {"Note", "MarkdownNote"}  # the frontend's virtual note nodes: in the UI file only, never in the API
# (node type, widget) -> the models folder its file is in; a widget value ending like a model file (the
# frontend's test for its missing-models scan) must be one of these and have a `models` entry
FILE_WIDGETS = {("CLIPLoader", "clip_name"): "text_encoders", ("VAELoader", "vae_name"): "vae",
                ("BlockCascadeModelLoader", "model_name"): "diffusion_models",
                ("BlockCascadeModelLoader", "lora"): "loras", ("BlockCascadeEmbedsLoader", "embeds"): "prompt_embeds",
                ("BlockCascadeDecoderLoader", "decoder_name"): ("vae", "vae_approx")}  # (it lists both folders)
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf")
# ComfyUI 0.3.64 app/custom_node_manager.py (unchanged through 0.27): the folders of a custom node pack it
# serves as workflow templates, each globbed as <custom_nodes>/*/<folder>/*.json and statically served
# at /api/workflow_templates/<pack>/
TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]
CONTROL = "control_after_generate"
UI_ONLY = {CONTROL, "upload"}  # widget values of the UI file that the API format leaves out


def node_facts(class_type: str) -> dict:
    """sockets {name: type}, widgets (in order, with CONTROL after a seed-like INT), optional names, outputs."""
    if class_type in CORE:
        return CORE[class_type]
    schema = OURS[class_type].GET_SCHEMA()
    sockets, widgets, optional = {}, [], set()
    for i in schema.inputs:
        if i.optional:
            optional.add(i.id)
        if i.io_type in WIDGET_TYPES:
            widgets.append(i.id)
            if getattr(i, "control_after_generate", None):
                widgets.append(CONTROL)
        else:
            sockets[i.id] = i.io_type
    return {"sockets": sockets, "widgets": widgets, "optional": optional,
            "outputs": [o.io_type for o in schema.outputs]}


UI_FILES = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
NAMES = [os.path.basename(p) for p in UI_FILES]


def load(name):
    with open(os.path.join(ROOT, "workflows", name)) as f:
        ui = json.load(f)
    with open(os.path.join(ROOT, "workflows", "api", name)) as f:
        api = json.load(f)
    return ui, api


def test_every_ui_workflow_has_an_api_twin_and_the_ten_are_there():
    api_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "workflows", "api", "*.json")))
    assert NAMES == api_names
    assert set(NAMES) >= {"text_to_video_cascade.json", "prompt_switching.json", "long_video_window_sink.json",
                          "multi_gpu.json", "causal_forcing_framewise.json", "longlive_interactive.json",
                          "image_to_video.json", "extend_video.json", "krea_realtime.json", "live_stream_endless.json"}


@pytest.mark.parametrize("name", NAMES)
def test_every_sampling_setting_is_spelled_out_in_every_api_workflow(name):
    """Each Config node gives every input of the node (the family settings included) and each Prompt
    Schedule its switch mode, so a script editing a workflow finds them all."""
    _, api = load(name)
    for ct in ("BlockCascadeConfig", "BlockCascadePromptSchedule"):
        facts = node_facts(ct)
        for inputs in _by_type(api, ct):
            assert set(facts["widgets"]) <= set(inputs), (ct, set(facts["widgets"]) - set(inputs))


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_consistent_litegraph_graph(name):
    ui, _ = load(name)
    assert ui["version"] == 0.4 and isinstance(ui["extra"], dict)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    links = {l[0]: l for l in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links)
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == typ
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n)
        if n["type"] in NOTES:  # one text widget, no sockets
            assert n["inputs"] == n["outputs"] == [] and [type(v) for v in n["widgets_values"]] == [str]
            continue
        facts = node_facts(n["type"])
        assert n["properties"]["Node name for S&R"] == n["type"]
        for i in n["inputs"]:
            assert facts["sockets"][i["name"]] == i["type"]
            assert i["link"] is None or i["link"] in links
            assert (i.get("shape") == 7) == (i["name"] in facts["optional"])
        assert [o["type"] for o in n["outputs"]] == facts["outputs"]
        for o in n["outputs"]:
            assert all(links[l][1] == n["id"] for l in o["links"])
        assert len(n["widgets_values"]) == len(facts["widgets"])


def ui_as_api(ui: dict) -> dict:
    """What the frontend's 'Export (API)' makes of a UI workflow (links + named widget values)."""
    links = {l[0]: l for l in ui["links"]}
    out = {}
    for n in ui["nodes"]:
        if n["type"] in NOTES:  # virtual: the export leaves notes out
            continue
        facts = node_facts(n["type"])
        inputs = {w: v for w, v in zip(facts["widgets"], n["widgets_values"]) if w not in UI_ONLY}
        for i in n["inputs"]:
            if i["link"] is not None:
                _, src, slot, _, _, _ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return out


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_holds_the_same_nodes_links_and_values(name):
    ui, api = load(name)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == ui_as_api(ui)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_uses_known_nodes_and_input_names(name):
    _, api = load(name)
    for node_id, node in api.items():
        ct = node["class_type"]
        assert ct in CORE or ct in OURS, f"{name}: node {node_id} has unknown class_type {ct}"
        facts = node_facts(ct)
        known = set(facts["sockets"]) | set(facts["widgets"]) - UI_ONLY
        assert set(node["inputs"]) <= known, f"{name}: {ct} has no input(s) {set(node['inputs']) - known}"
        required = known - facts["optional"]
        if ct == "BlockCascadeSampler":  # positive or schedule (checked at run), VAE optional
            required -= {"positive", "schedule", "vae", "decoder", "preview_decoder"}
        assert required <= set(node["inputs"]), f"{name}: {ct} lacks {required - set(node['inputs'])}"
        for inp, value in node["inputs"].items():
            if isinstance(value, list):
                src = api[value[0]]
                assert node_facts(src["class_type"])["outputs"][value[1]] == facts["sockets"][inp]
        if ct == "CLIPLoader":
            assert node["inputs"]["type"] in CLIP_TYPES_064 and node["inputs"]["type"] == "wan"
        if ct in OURS:  # ComfyUI's queue-time validation accepts every value, and so does the config node
            cls = OURS[ct]
            errors = [e for e in execution.node_errors(cls, node["inputs"])
                      if e["extra_info"]["input_name"] not in FILE_INPUTS]  # files absent from this machine
            assert errors == [], f"{name}: node {node_id}"
            if ct == "BlockCascadeConfig":  # (the device list is checked on the machine)
                v = node["inputs"]
                checks.cascade_config(v["family"], v["steps"], v["parallel"], v["attention"], v["window"], v["sink"],
                                      v["shift"], v["flashblock"], v["frames_per_block"], v["independent_first_frame"],
                                      v["first_block_steps"], v["warp"], v["context_noise"])
            elif ct == "BlockCascadeSampler":
                ins = node["inputs"]
                checks.video_size(ins["width"], ins["height"])
                assert ("positive" in ins) != ("schedule" in ins)

def _by_type(api, class_type):
    return [n["inputs"] for n in api.values() if n["class_type"] == class_type]


def test_each_workflow_is_what_it_claims():
    _, t2v = load("text_to_video_cascade.json")
    (cfg,) = _by_type(t2v, "BlockCascadeConfig")
    assert cfg["parallel"] > 1 and cfg["devices"] == "auto"
    _, sw = load("prompt_switching.json")
    starts = sorted(s["start_block"] for s in _by_type(sw, "BlockCascadePromptSchedule"))
    (smp,) = _by_type(sw, "BlockCascadeSampler")
    assert starts[0] == 0 and len(starts) >= 2 and starts[-1] < smp["blocks"]
    _, long = load("long_video_window_sink.json")
    (cfg,) = _by_type(long, "BlockCascadeConfig")
    assert (cfg["window"], cfg["sink"]) == (12, 3)
    _, multi = load("multi_gpu.json")
    (cfg,) = _by_type(multi, "BlockCascadeConfig")
    assert cfg["devices"] == "cuda:0,cuda:1"
    _, framewise = load("causal_forcing_framewise.json")
    (cfg,) = _by_type(framewise, "BlockCascadeConfig")
    (smp,) = _by_type(framewise, "BlockCascadeSampler")
    assert cfg["family"] == "causal-forcing-framewise" and smp["blocks"] == 21  # 21 latent frames = 81 frames
    _, live = load("longlive_interactive.json")
    (cfg,) = _by_type(live, "BlockCascadeConfig")
    schedules = _by_type(live, "BlockCascadePromptSchedule")
    assert cfg["family"] == "longlive" and cfg["window"] == cfg["sink"] == -1  # the family's 12 and 3
    assert len(schedules) >= 2 and all(s["switch_mode"] == "recache" for s in schedules)
    (loader,) = _by_type(live, "BlockCascadeModelLoader")
    assert loader["lora"] != "none"  # LongLive ships base + LoRA
    (smp,) = _by_type(live, "BlockCascadeSampler")
    (clip_id,) = [k for k, n in live.items() if n["class_type"] == "CLIPLoader"]
    # steerable: the prompts' CLIP on the sampler's clip input, at one block in flight (a re-cache at P>1
    # allows no switch, so a connected CLIP would be refused)
    assert smp["clip"] == [clip_id, 0] and cfg["parallel"] == 1
    _, krea = load("krea_realtime.json")
    (cfg,) = _by_type(krea, "BlockCascadeConfig")
    (smp,) = _by_type(krea, "BlockCascadeSampler")
    (vae_id,) = [k for k, n in krea.items() if n["class_type"] == "VAELoader"]
    assert cfg["family"] == "krea-realtime" and (cfg["parallel"], cfg["kv_recompute"]) == (0, -1)  # the family's
    assert smp["vae"] == [vae_id, 0] and smp["blocks"] == 9  # re-encodes from block 3 on; Krea's default length
    _, i2v = load("image_to_video.json")
    (smp,) = _by_type(i2v, "BlockCascadeSampler")
    (image_id,) = [k for k, n in i2v.items() if n["class_type"] == "LoadImage"]
    assert smp["start_image"] == [image_id, 0] and "vae" in smp and "prefix" not in smp
    _, extend = load("extend_video.json")
    samplers = {k: n["inputs"] for k, n in extend.items() if n["class_type"] == "BlockCascadeSampler"}
    (second,) = [k for k, s in samplers.items() if "prefix" in s]
    (first,) = set(samplers) - {second}
    assert samplers[second]["prefix"] == [first, 0] and samplers[first]["seed"] != samplers[second]["seed"]
    (cv,) = _by_type(extend, "CreateVideo")
    assert cv["images"] == [second, 1]  # the whole video: the second sampler's IMAGE
    _, stream = load("live_stream_endless.json")
    (cfg,) = _by_type(stream, "BlockCascadeConfig")
    (smp,) = _by_type(stream, "BlockCascadeSampler")
    (clip_id,) = [k for k, n in stream.items() if n["class_type"] == "CLIPLoader"]
    assert cfg["family"] == "longlive" and smp["blocks"] == 0  # endless, in LongLive's window
    assert smp["clip"] == [clip_id, 0] and "vae" in smp  # steerable, decoded into the recording
    _, light = load("lightvae_live_preview.json")
    (smp,) = _by_type(light, "BlockCascadeSampler")
    names = {k: n["inputs"]["decoder_name"] for k, n in light.items() if n["class_type"] == "BlockCascadeDecoderLoader"}
    assert names[smp["decoder"][0]] == "lightvaew2_1.pth" and names[smp["preview_decoder"][0]] == "lighttaew2_1.pth"
    assert "vae" not in smp and "VAELoader" not in {n["class_type"] for n in light.values()}  # nothing to encode
    _, v2v = load("file_to_video.json")
    (node,) = _by_type(v2v, "BlockCascadeVideoToVideo")
    (video_id,) = [k for k, n in v2v.items() if n["class_type"] == "LoadVideo"]
    assert node["video"] == [video_id, 0] and node["live"] == "none" and "image" not in node
    _, cam = load("webcam_to_video.json")
    (node,) = _by_type(cam, "BlockCascadeVideoToVideo")
    (clip_id,) = [k for k, n in cam.items() if n["class_type"] == "CLIPLoader"]
    assert node["live"] == "webcam" and "video" not in node and "image" not in node and node["clip"] == [clip_id, 0]
    for name, family, image in (("longlive2_text_to_video.json", "longlive-2", False),
                                ("longlive2_image_to_video.json", "longlive-2", True),
                                ("causal_wan22_a14b_text_to_video.json", "causal-wan2.2-a14b", False)):
        _, wf = load(name)
        (cfg,) = _by_type(wf, "BlockCascadeConfig")
        (smp,) = _by_type(wf, "BlockCascadeSampler")
        (vae,) = _by_type(wf, "VAELoader")
        assert cfg["family"] == family and smp["vae"][0] in wf
        assert vae["vae_name"] == ("wan2.2_vae.safetensors" if family == "longlive-2" else "wan_2.1_vae.safetensors")
        loads = [k for k, n in wf.items() if n["class_type"] == "LoadImage"]
        assert ("start_image" in smp) == image and (smp["start_image"] == [loads[0], 0] if image else loads == [])
    for name in NAMES:
        _, api = load(name)
        types = {n["class_type"] for n in api.values()}
        assert {"CLIPLoader", "CLIPTextEncode", "CreateVideo", "SaveVideo"} <= types
        assert types & {"BlockCascadeSampler", "BlockCascadeVideoToVideo"}, name
        assert types & {"VAELoader", "BlockCascadeDecoderLoader"}, name  # something decodes the video
        (cv,) = _by_type(api, "CreateVideo")
        assert cv["fps"] == (24.0 if name.startswith("longlive2") else 16.0), name  # Wan2.2-TI2V-5B: 24 fps


def _file_widgets(ui: dict):
    """(node, widget name, value) for each widget value of a UI workflow that names a model file."""
    for n in ui["nodes"]:
        if n["type"] in NOTES:
            continue
        for widget, value in zip(node_facts(n["type"])["widgets"], n["widgets_values"]):
            if (n["type"], widget) in FILE_WIDGETS and value != "none" or \
                    isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES):
                yield n, widget, value


def _url_names_file(url: str, name: str) -> bool:
    """An https Hugging Face resolve URL of the file (same base name), or the repository's page."""
    resolve = re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/[\w.-]+/(\S+)", url)
    return bool(resolve and resolve.group(1).split("/")[-1] == name.split("/")[-1]
                or re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+", url))


@pytest.mark.parametrize("name", NAMES)
def test_every_file_a_loader_names_has_a_models_entry(name):
    """As core templates do (properties.models of the loader node: name as in the widget, a direct
    download URL, the models folder), so ComfyUI's missing-models dialog names and offers each file."""
    ui, _ = load(name)
    files = list(_file_widgets(ui))
    assert files
    for n, widget, value in files:
        assert (n["type"], widget) in FILE_WIDGETS, f"{name}: node {n['id']} {widget}={value!r}: folder unknown"
        entries = [m for m in n["properties"].get("models", []) if m["name"] == value]
        assert len(entries) == 1, f"{name}: node {n['id']} ({n['type']}) has no models entry for {value!r}"
        (m,) = entries
        assert set(m) == {"name", "url", "directory"}
        folders = FILE_WIDGETS[n["type"], widget]
        assert m["directory"] in (folders if isinstance(folders, tuple) else (folders,)), (name, m)
        assert _url_names_file(m["url"], value), (name, m)
    for n in ui["nodes"]:  # and no entry naming a file the node does not use
        used = {v for node, _, v in files if node is n}
        assert {m["name"] for m in n["properties"].get("models", [])} == used, (name, n["id"])


def test_each_file_has_one_spelling_across_the_workflows_and_readme():
    """One URL per file name and one name per URL over every workflow (UI and API agree by the twin
    test); each model's LoRA is the same file everywhere; and README names each file as the workflows do
    (alone or as the end of the path in its repository)."""
    by_name, by_url, loras = {}, {}, {}
    for name in NAMES:
        ui, api = load(name)
        for n in ui["nodes"]:
            for m in n["properties"].get("models", []):
                by_name.setdefault(m["name"], set()).add(m["url"])
                by_url.setdefault(m["url"], set()).add(m["name"])
        for loader in _by_type(api, "BlockCascadeModelLoader"):
            if loader["lora"] != "none":
                loras.setdefault(loader["model_name"], set()).add(loader["lora"])
    assert by_name and all(len(urls) == 1 for urls in by_name.values()), by_name
    assert all(len(names) == 1 for names in by_url.values()), by_url
    assert all(len(files) == 1 for files in loras.values()), loras
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for file in by_name:
        assert re.search(r"`(?:[\w.+-]+/)*" + re.escape(file) + "`", readme), f"README does not name {file}"


@pytest.mark.parametrize("name", NAMES)
def test_every_ui_workflow_carries_a_note_naming_its_checkpoint_and_what_to_try(name):
    ui, api = load(name)
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] in NOTES]
    assert len(notes) == 1, name
    (text,) = notes
    assert len(text.splitlines()) >= 3 and "Try" in text, name
    for loader in _by_type(api, "BlockCascadeModelLoader"):  # the checkpoint (and LoRA) it is for
        assert loader["model_name"] in text and (loader["lora"] == "none" or loader["lora"] in text), name
    assert not any(n["class_type"] in NOTES for n in api.values())


def _template_listing(custom_nodes: str) -> dict:
    """What ComfyUI's GET /workflow_templates answers for a custom_nodes folder (its code, as facts)."""
    listing = {}
    for folder in TEMPLATE_FOLDERS:
        for file in glob.glob(os.path.join(custom_nodes, f"*/{folder}/*.json")):
            pack = os.path.basename(os.path.dirname(os.path.dirname(file)))
            listing.setdefault(pack, []).append(os.path.splitext(os.path.basename(file))[0])
    return listing


def test_the_template_browser_lists_each_ui_workflow_once(tmp_path):
    """ComfyUI serves a pack's workflows/ as templates (one of the folder names it reads; example_workflows
    is another): the pack holds one such folder (a second would list every workflow twice) and the
    listing is exactly the UI workflows, the API twins in workflows/api not among them."""
    held = [f for f in TEMPLATE_FOLDERS if os.path.isdir(os.path.join(ROOT, f))]
    assert held == ["workflows"]
    os.symlink(ROOT, tmp_path / "block_cascade")
    listing = _template_listing(str(tmp_path))
    assert sorted(listing["block_cascade"]) == [os.path.splitext(n)[0] for n in NAMES]
    for stem in listing["block_cascade"]:  # what /api/workflow_templates/<pack>/<stem>.json serves
        with open(os.path.join(ROOT, "workflows", stem + ".json")) as f:
            assert "nodes" in json.load(f)


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_the_template_folders_are_those_comfyui_reads():
    with open(os.path.join(os.environ["COMFYUI_DIR"], "app", "custom_node_manager.py")) as f:
        source = f.read()
    (names,) = re.findall(r"example_workflow_folder_names = (\[[^\]]*\])", source)
    assert json.loads(names) == TEMPLATE_FOLDERS
