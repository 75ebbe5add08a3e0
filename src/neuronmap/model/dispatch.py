"""Models larger than one device: decoder layers placed over GPUs, the CPU and the disk by
accelerate, and where each part of such a model computes.

`device_map: single` is the whole model on one device. `auto` and `balanced` give each decoder
layer whole to one device (a layer's neurons are never split, unlike tensor parallelism): auto
fills the job's GPUs in order, balanced spreads the layers evenly over them, and what does not fit
`max_memory` goes to the CPU or the disk as `offload` allows. A dispatched model keeps its
weights where accelerate put them; its hooks move activations from layer to layer, and an
offloaded layer's weights are read from the safetensors files at each forward pass.

The rest of the package asks this module where things are: `input_device` (where inputs go),
`execution_device` (where a module computes: its layer's device, also for an offloaded module
whose parameters are on the meta device between forward passes) and `materialized` (an
offloaded module's weights, for the code that reads weights rather than running the model).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import shutil
import tempfile

import torch

from ..errors import NeuronmapError


def _hook_device(module: torch.nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device where it has placed the module,
    else the device of its first parameter or buffer that is not on the meta device."""
    device = _hook_device(module)
    if device is not None:
        return device
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    for child in module.modules():  # an offloaded module: its hooked children know
        device = _hook_device(child)
        if device is not None:
            return device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch's token ids go: the input embedding's device (not the first parameter's,
    which in a dispatched model may be on another GPU, or offloaded)."""
    return execution_device(model.get_input_embeddings())


def is_dispatched(model: torch.nn.Module) -> bool:
    return any(hasattr(module, "_hf_hook") for module in model.modules())


@contextlib.contextmanager
def materialized(module: torch.nn.Module, exclude=()):
    """Within the context, every weight of `module` (but those of the `exclude`d submodules) is a
    real tensor on its execution device: offloaded weights are loaded, and dropped again on exit.
    A no-op for a model in memory."""
    from accelerate.utils import align_module_device, has_offloaded_params
    skipped = {id(sub) for excluded in exclude for sub in excluded.modules()}
    with contextlib.ExitStack() as stack:
        for child in module.modules():
            if id(child) not in skipped and has_offloaded_params(child):
                stack.enter_context(align_module_device(child))
        yield module


def size_in_bytes(value: int | str) -> int:
    """A max_memory value: bytes, or a size such as "20GiB" or "500MB"."""
    from accelerate.utils import convert_file_size_to_int
    try:
        return convert_file_size_to_int(value)
    except ValueError:
        raise NeuronmapError(f"max_memory: {value!r} is not a size (bytes, or e.g. 20GiB, 500MB)") from None


def memory_budget(max_memory: dict, offload: str, device: torch.device, available: dict) -> dict:
    """accelerate's max_memory for a job: each GPU (on a CUDA device) and, where the CPU holds
    weights (a CPU job, or offload to cpu or disk), the CPU; a device that max_memory does not
    name gets `available[device]`. Keys are GPU indices and "cpu"."""
    budget: dict[int | str, int] = {}
    if device.type == "cuda":
        for key in sorted(k for k in available if isinstance(k, int)):
            budget[key] = size_in_bytes(max_memory[str(key)]) if str(key) in max_memory else available[key]
    if device.type == "cpu" or offload != "none":
        budget["cpu"] = size_in_bytes(max_memory["cpu"]) if "cpu" in max_memory else available["cpu"]
    return budget


def place_layers(model: torch.nn.Module, budget: dict, balanced: bool, dtype: torch.dtype) -> dict[str, object]:
    """Module name -> device (GPU index, "cpu" or "disk") for a model (instantiated on the meta
    device: nothing is read), decoder layers never split."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    no_split = sorted(model._no_split_modules or [])
    gpus = [key for key in budget if isinstance(key, int)]
    if balanced and len(gpus) > 1:
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    return dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype))


def check_offload(device_map: dict, offload: str, on_gpu: bool) -> None:
    """Refuse a placement that puts weights where `offload` does not allow them."""
    used = set(device_map.values())
    allowed = {"none": set(), "cpu": {"cpu"}, "disk": {"cpu", "disk"}}[offload]
    if not on_gpu:
        allowed = allowed | {"cpu"}
    spilled = sorted(str(device) for device in used - allowed if device in ("cpu", "disk"))
    if spilled:
        modules = [name for name, device in device_map.items() if str(device) in spilled]
        raise NeuronmapError(
            f"max_memory: the model does not fit the memory given to its devices with offload: {offload} "
            f"({len(modules)} modules, e.g. {modules[0] or 'the whole model'}, would go to {' and '.join(spilled)}): "
            "raise max_memory, give the job more GPUs (gpus_per_job), or set offload: "
            f"{'disk' if 'disk' in spilled else 'cpu'}")


def offload_folder() -> str:
    """A folder for the weights accelerate offloads to disk that it cannot read in place from
    safetensors files; removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="neuronmap-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def meta_model(config, trust_remote_code: bool = False):
    """The model of a transformers config on the meta device: its modules and shapes, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def site_device(sites, site: str, layer: int) -> torch.device:
    """Where a (site, layer) of an MlpSites is computed, so its running statistics live there."""
    return execution_device(sites.point(site, layer).module)
