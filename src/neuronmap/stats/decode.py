"""Decoding intermediate neurons through the LM head (Davies 2025; docs/methods.md §2).

Neuron i of a layer reads the residual stream along row i of `up_proj` (and of `gate_proj` in a
gated MLP) and writes along column i of `down_proj`. In neuronmap's unit names these are the
vectors of units (up, layer, i), (gate, layer, i) and (act, layer, i). Each of these vectors,
multiplied by the unembedding, scores every token; the top tokens label the neuron. Optionally
the vector is first scaled by the final norm's gain, as the residual stream is before the
unembedding (whether the gain belongs there is unconfirmed, so both variants are written).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import pyarrow as pa
import torch
from tqdm import tqdm

from ..errors import NeuronmapError
from ..io import tables
from ..model.architectures import MlpSites, final_norm_gain, linear_weight
from ..model.dispatch import materialized

log = logging.getLogger(__name__)

# The vector each site's unit i owns -> (site whose module holds it, True if it is row i of that
# module's [out, in] weight, False if column i): up and gate units read the residual stream along
# their rows; the act unit (the neuron, input of down_proj) writes along down_proj's column i.
VECTORS = {"up": ("up", True), "gate": ("gate", True), "act": ("down", False)}


def neuron_vectors(sites: MlpSites, site: str, layer: int) -> torch.Tensor:
    """[intermediate units, hidden] for one layer: up/gate rows, or down_proj columns for act."""
    module_site, is_row = VECTORS[site]
    weight = linear_weight(sites.point(module_site, layer).module)
    return weight if is_row else weight.T


def available_sites(sites: MlpSites, wanted: Sequence[str]) -> list[str]:
    """The wanted sites whose vectors this architecture has (a non-gated MLP has no gate)."""
    present = []
    for site in wanted:
        if site not in VECTORS:
            raise NeuronmapError(f"decode.sites: unknown {site!r} (choose from {', '.join(VECTORS)})")
        try:
            sites.point(VECTORS[site][0], 0)
        except (NeuronmapError, AttributeError):
            log.warning("decode: this architecture has no %s site; skipped", site)
            continue
        present.append(site)
    return present


def search_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the candidate search: bfloat16 where it is faster than float32 (CUDA, CPUs
    with AMX tiles), else float32, which needs no rescoring. AVX512-BF16 alone is not enough: on
    such a CPU without AMX (2 cores, torch 2.13) a [512, 576] x [576, 49152] product took
    0.23 s in bfloat16 against 0.16 s in float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return torch.float32


def top_k_rows(scores: torch.Tensor, k: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k, dim=1) (indices, values) read from the k groups of `group` columns
    with the largest maxima, which hold every one of a row's k largest values (a group that holds
    one has a maximum at least that large, and k groups with larger maxima would be k larger
    values). One pass for the maxima and a top-k over k * group candidates: 2.8x faster than
    torch.topk over 49,152 scores per row on one CPU thread. Among exactly tied values the
    indices may differ from torch.topk's."""
    rows, n = scores.shape
    if n < 4 * k * group:
        top = torch.topk(scores, k, dim=1)
        return top.indices, top.values
    padded = torch.nn.functional.pad(scores, (0, -n % group), value=float("-inf"))
    groups = padded.view(rows, -1, group)
    best = groups.amax(2).topk(k, dim=1).indices
    candidates = groups.gather(1, best[:, :, None].expand(-1, -1, group)).reshape(rows, k * group)
    top = candidates.topk(k, dim=1)
    columns = best[:, :, None] * group + torch.arange(group, device=scores.device)
    return columns.reshape(rows, k * group).gather(1, top.indices), top.values


def top_tokens(block: torch.Tensor, unembedding: torch.Tensor, top_n: int, search: torch.Tensor | None,
               candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top token ids and exact scores of unembedding @ v for every row v of `block`.

    With `search` (the unembedding in a faster, coarser dtype), the `candidates` best tokens are
    found in that dtype and rescored exactly in the block's dtype; the top_n of those are kept.
    """
    if search is None:
        return top_k_rows(block @ unembedding.T, top_n)
    coarse = block.to(search.dtype) @ search.T
    picked = torch.topk(coarse, min(candidates, coarse.shape[1]), dim=1).indices
    exact = torch.einsum("uch,uh->uc", unembedding[picked], block)
    top = torch.topk(exact, top_n, dim=1)
    return picked.gather(1, top.indices), top.values


def decode_chunks(model, site_names: Sequence[str], norm_variants: Sequence[bool], top_n: int,
                  chunk_size: int = 512, search: str = "auto",
                  candidates: int | None = None) -> Iterator[tuple[str, bool, int, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]]:
    """Yield (site, norm_gain, layer, unit ids, top token ids, top scores), chunk by chunk."""
    sites = MlpSites(model)
    # A dispatched model's weights may be offloaded: the head and the final norm are loaded for the
    # whole decoding, each layer's MLP while it is decoded, and every vector meets the unembedding
    # on the unembedding's device.
    with torch.inference_mode(), materialized(model, exclude=sites.layers):
        unembedding = model.get_output_embeddings().weight.detach()  # [vocab, hidden]
        coarse = search_dtype(search, unembedding.device)
        searched = unembedding.to(coarse) if coarse != unembedding.dtype else None
        candidates = candidates or max(4 * top_n, top_n + 32)
        gain = final_norm_gain(model).to(unembedding) if any(norm_variants) else None
        for layer in range(sites.n_layers):
            with materialized(sites.layers[layer]):
                vectors = {site: neuron_vectors(sites, site, layer).detach().to(unembedding) for site in site_names}
            for site in site_names:
                weights = vectors[site]
                for start in range(0, weights.shape[0], chunk_size):
                    block = weights[start:start + chunk_size]
                    units = torch.arange(start, start + block.shape[0])
                    for norm_gain in norm_variants:
                        ids, scores = top_tokens(block * gain if norm_gain else block, unembedding, top_n,
                                                 searched, candidates)
                        yield site, norm_gain, layer, units, ids.cpu(), scores.float().cpu()


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Each token id decoded on its own (so a leading space shows), ids past the tokenizer as ''."""
    strings = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
    return strings + [""] * (vocab_size - len(strings))


def decode_neurons(model, tokenizer, site_names: Sequence[str] = ("up", "gate", "act"),
                   norm_variants: Sequence[bool] = (False, True), top_n: int = 10,
                   chunk_size: int = 512, search: str = "auto") -> pa.Table:
    """One row per (site, layer, unit, norm_gain) with its top tokens; see docs/parquet.md."""
    sites = MlpSites(model)
    site_names = available_sites(sites, site_names)
    if not site_names:
        raise NeuronmapError("decode.sites: none of the requested sites' vectors exists in this model")
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_n <= vocab:
        raise NeuronmapError(f"decode.top_n: {top_n} must be between 1 and the vocabulary size {vocab}")
    strings = token_strings(tokenizer, vocab)
    parts = []
    chunks = decode_chunks(model, site_names, norm_variants, top_n, chunk_size, search)
    for site, norm_gain, layer, units, ids, values in tqdm(chunks, desc="decode", unit="chunk", mininterval=2):
        n = units.numel()
        flat_ids = ids.reshape(-1).numpy()
        offsets = pa.array(range(0, (n + 1) * top_n, top_n), pa.int32())
        parts.append(pa.table({
            "site": pa.array([site] * n, pa.string()),
            "layer": pa.array([layer] * n, pa.int32()),
            "unit": pa.array(units.numpy(), pa.int32()),
            "norm_gain": pa.array([norm_gain] * n, pa.bool_()),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids, pa.int32())),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array([strings[i] for i in flat_ids], pa.string())),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).numpy(), pa.float32())),
        }, schema=tables.DECODED))
    log.info("decoded sites %s x %d layers x %d norm variants", ", ".join(site_names), sites.n_layers,
             len(norm_variants))
    return pa.concat_tables(parts)
