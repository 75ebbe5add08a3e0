"""Building the text model the config names (`explain.explainer`, `explain.scorer`). Apart from
backends.py because the endpoint backend imports that module's interface: the factory importing
the endpoint there would make the two import each other."""

from __future__ import annotations

from ..errors import NeuronmapError
from .backends import BackendSettings, LocalModel, TextModel


def load_local(spec: BackendSettings, model_dir, model_settings, threads: int = 0, batch_size: int = 8) -> LocalModel:
    """The `local` backend: `spec.model` (a Hugging Face directory or cached hub id), or the run's
    prepared model (`model_dir`) when it is null."""
    from ..model.loading import load_for_job, pick_device, pick_dtype
    if spec.model is None:
        from ..model.source import read_manifest
        model, tokenizer = load_for_job(model_dir, model_settings, threads)
        return LocalModel(model, tokenizer, read_manifest(model_dir)["source"], batch_size)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(model_settings.device)
    tokenizer = AutoTokenizer.from_pretrained(spec.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=pick_dtype(model_settings.dtype, device),
                                                 local_files_only=True).to(device).eval()
    return LocalModel(model, tokenizer, spec.model, batch_size)


def text_model(spec: BackendSettings, model_dir, model_settings=None, threads: int = 0, batch_size: int = 8,
               loaded=None, where: str = "explain.explainer") -> TextModel:
    """The text model `spec` names. `loaded`: a LocalModel already in memory for the same model
    (the explainer and the scorer share the run's model instead of loading it twice)."""
    if spec.backend == "local":
        if loaded is not None and loaded.name == (spec.model or loaded.name):
            return loaded
        return load_local(spec, model_dir, model_settings, threads, batch_size)
    if spec.backend == "endpoint":
        from .endpoint import EndpointModel  # only a run that asks a server needs its client
        if not spec.url or not spec.model:
            raise NeuronmapError(f"{where}: the endpoint backend needs url and model")
        return EndpointModel(spec.url, spec.model, spec.concurrency, spec.retries, spec.timeout_s,
                             spec.request_budget, spec.api_key_env, where=where)
    raise NeuronmapError(f"explain: unknown text model backend {spec.backend!r} (local, endpoint)")
