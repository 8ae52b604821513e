"""Stand-in for comfy.model_management: the interrupt flag, the device, cache and memory calls."""
import threading

import torch


class InterruptProcessingException(Exception):
    pass


_lock = threading.RLock()
interrupt_processing = False
calls = []  # (name, args) of memory-management calls, for tests


def interrupt_current_processing(value=True):
    global interrupt_processing
    with _lock:
        interrupt_processing = value


def processing_interrupted():
    with _lock:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with _lock:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def get_free_memory(dev=None, torch_free_too=False):
    return 1 << 40


def free_memory(memory_required, device, keep_loaded=()):
    calls.append(("free_memory", memory_required, device))
    return []


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    calls.append(("load_models_gpu", tuple(models), force_patch_weights, force_full_load))
    for m in models:
        if hasattr(m, "patch_model"):
            m.patch_model()


def soft_empty_cache(force=False):
    calls.append(("soft_empty_cache",))
