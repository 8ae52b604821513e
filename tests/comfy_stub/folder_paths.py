"""Stand-in for ComfyUI's folder_paths: model folders under $BLOCK_CASCADE_TEST_MODELS (or a temp dir)."""
import os
import tempfile

base_path = os.environ.get("BLOCK_CASCADE_TEST_ROOT") or tempfile.mkdtemp(prefix="bc-comfy-")
models_dir = os.path.join(base_path, "models")
EXTS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".sft"}
folder_names_and_paths = {
    "diffusion_models": ([os.path.join(models_dir, "diffusion_models")], EXTS),
    "vae": ([os.path.join(models_dir, "vae")], EXTS),
    "vae_approx": ([os.path.join(models_dir, "vae_approx")], EXTS),
    "text_encoders": ([os.path.join(models_dir, "text_encoders")], EXTS),
    "loras": ([os.path.join(models_dir, "loras")], EXTS),
}


def get_folder_paths(name):
    return list(folder_names_and_paths[name][0])


def get_filename_list(name):
    paths, exts = folder_names_and_paths[name]
    found = []
    for root in paths:
        if not os.path.isdir(root):
            continue
        for dirpath, _, files in os.walk(root):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(name, filename):
    for root in folder_names_and_paths[name][0]:
        p = os.path.join(root, filename)
        if os.path.isfile(p):
            return p
    return None


def get_full_path_or_raise(name, filename):
    p = get_full_path(name, filename)
    if p is None:
        raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
    return p


def get_output_directory():
    return os.path.join(base_path, "output")


def get_user_directory():
    return os.path.join(base_path, "user")


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    """(folder, file name, counter, subfolder, prefix): the counter is one past the highest of the files
    named ``name_NNNNN_...`` already in the folder, as ComfyUI's own counts."""
    subfolder, name = os.path.split(os.path.normpath(filename_prefix))
    folder = os.path.join(output_dir, subfolder)
    taken = [int(f[len(name) + 1:].split("_")[0]) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
             if f.startswith(name + "_") and f[len(name) + 1:].split("_")[0].isdigit()]
    return folder, name, max(taken, default=0) + 1, subfolder, filename_prefix
