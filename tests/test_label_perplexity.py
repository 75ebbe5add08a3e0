"""The labels stage's perplexity check on the embedded model: every held-out context's NLL under
the batched, per-row-masked pass equals one forward of that context alone (under the
single-configuration `deactivated` hooks for a selection); the selected units are exactly zero
during the pass; a selection of 0 units gives the baseline's NLLs exactly; the random controls
match the selection's sites and layers; the summary equals a numpy/scipy recomputation from the
per-context file."""

import contextlib
import dataclasses
import itertools
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from neuronmap.corpus.contexts import cut_contexts
from neuronmap.corpus.reading import read_documents
from neuronmap.errors import NeuronmapError
from neuronmap.io import tables
from neuronmap.io.parquet import write_table
from neuronmap.labels import perplexity as lp
from neuronmap.labels.settings import PerplexitySettings
from neuronmap.model.architectures import MlpSites
from neuronmap.model.deactivation import RowDeactivation, deactivated

from conftest import REPO

CONTEXT_TOKENS = 16
PER_LABEL = 2
SEEDS = (1, 2)
METHODS = ("lape", "ap")
RESAMPLES = 200
# Hand-made selections over every site; lape/de selects nothing (a 0-unit configuration).
SELECTIONS = {
    ("lape", "en"): {("gate", 3): [5, 100, 900], ("act", 10): [7, 1535], ("down", 20): [2, 575]},
    ("ap", "en"): {("up", 5): [1, 2, 3]},
    ("ap", "de"): {("gate", 3): [5, 6], ("act", 29): [1535]},
}


def units_table(selections) -> pl.DataFrame:
    rows = [{"method": m, "label": a, "site": site, "layer": layer, "unit": u, "score": 1.0 / (r + 1), "rank": r + 1}
            for (m, a), units in selections.items()
            for r, (site, layer, u) in enumerate((s, l, u) for (s, l), us in units.items() for u in us)]
    return pl.from_arrow(pl.DataFrame(rows).to_arrow().select(tables.LABEL_UNITS.names).cast(tables.LABEL_UNITS))


@pytest.fixture(scope="module")
def contexts(smollm2):
    """Contexts of 16 tokens at most from the first documents of each label; the last five of
    each label held out (more than PER_LABEL, so that the first ones must be picked), the first
    held-out one of en cut to a single token (it predicts nothing, so it is skipped)."""
    _, tokenizer = smollm2
    documents = read_documents(REPO / "tests" / "data" / "corpus")
    picked = [d for label in ("de", "en") for d in [d for d in documents if d.label == label][:3]]
    frame = cut_contexts(tokenizer, picked, CONTEXT_TOKENS, 1, 0.0)
    heldout = frame.group_by("label").agg(pl.col("context_id").sort().tail(5)).explode("context_id")
    frame = frame.with_columns(heldout=pl.col("context_id").is_in(heldout["context_id"].to_list()))
    short = heldout.filter(pl.col("label") == "en")["context_id"].min()
    return frame.with_columns(
        token_ids=pl.when(pl.col("context_id") == short).then(pl.col("token_ids").list.head(1))
        .otherwise(pl.col("token_ids")),
        n_tokens=pl.when(pl.col("context_id") == short).then(pl.lit(1, pl.Int32)).otherwise(pl.col("n_tokens")))


@pytest.fixture(scope="module")
def label_units():
    return units_table(SELECTIONS)


@pytest.fixture(scope="module")
def plan(smollm2, label_units):
    model, _ = smollm2
    sites = MlpSites(model)
    return lp.configurations(label_units, METHODS, ["de", "en"], SEEDS,
                             {site: sites.width(site) for site in sites.available})


class Probed(RowDeactivation):
    """RowDeactivation that, after its own hooks, checks every touched point's values: each row's
    masked units are exactly zero at every position."""
    checked = Counter()
    nonzero_elsewhere = Counter()

    def set_rows(self, rows):
        super().set_rows(rows)
        self.current = [int(r) for r in rows]

    @contextlib.contextmanager
    def installed(self):
        with super().installed():
            handles = []
            for point in self.masks:
                site_point = self.sites.point(*point)

                def probe(module, args, output=None, point=point, is_input=site_point.is_input):
                    x = args[0] if is_input else output
                    for row, config in enumerate(self.current):
                        ids = self.configs[config].units.get(point)
                        if ids is not None:
                            assert torch.all(x[row, :, torch.as_tensor(ids)] == 0), (point, config)
                            Probed.checked[point] += len(ids)
                        elif torch.any(x[row, :, torch.as_tensor(self.masks[point].columns)] != 0):
                            Probed.nonzero_elsewhere[point] += 1
                handles.append(site_point.register(probe))
            try:
                yield self
            finally:
                for handle in handles:
                    handle.remove()


@pytest.fixture(scope="module")
def per_context(smollm2, contexts, label_units):
    model, tokenizer = smollm2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lp, "RowDeactivation", Probed)
        return lp.label_perplexity(model, contexts, label_units, METHODS, PER_LABEL, SEEDS, tokenizer.pad_token_id)


def alone_nll(model, ids) -> float:
    """One unbatched forward of the context alone; cross-entropy by hand."""
    ids = torch.as_tensor(np.asarray(ids, np.int64))[None]
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    log_probs = logits[:-1] - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)
    return float(-log_probs[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean())


def test_heldout_contexts_are_each_labels_first(contexts, per_context):
    expected = {}
    for row in contexts.sort("context_id").iter_rows(named=True):
        if row["heldout"] and row["n_tokens"] >= 2 and len(expected.setdefault(row["label"], [])) < PER_LABEL:
            expected[row["label"]].append(row["context_id"])
    baseline = per_context.filter(pl.col("control") == "none")
    assert {label: sorted(group["context_id"].to_list()) for (label,), group in baseline.group_by("eval_label")} \
        == expected
    assert contexts.filter(pl.col("heldout")).height > 2 * PER_LABEL  # the limit really cut
    n_tokens = dict(zip(contexts["context_id"], contexts["n_tokens"]))
    assert all(t == n_tokens[c] - 1 for c, t in zip(per_context["context_id"], per_context["tokens"]))
    assert len(set(n_tokens[c] for c in baseline["context_id"])) > 1  # padding is exercised


def test_every_configuration_scores_every_context(per_context, plan):
    assert per_context.height == len(plan) * 2 * PER_LABEL
    keys = per_context.select(lp.CONFIG_KEY).unique(maintain_order=True).rows()
    assert keys == [(c.method, c.ablated_label, c.control, c.seed) for c in plan]
    baseline = per_context.filter(pl.col("control") == "none")
    assert baseline["method"].unique().to_list() == ["none"] and baseline["ablated_label"].unique().to_list() == [""]
    assert (baseline["seed"] == 0).all() and (baseline["units"] == 0).all()


def test_nll_equals_one_context_alone(smollm2, contexts, per_context, plan):
    """Baseline, every selection and one random control: batched and masked == one at a time."""
    model, _ = smollm2
    ids = dict(zip(contexts["context_id"], contexts["token_ids"].to_list()))
    sites = MlpSites(model)
    # (the empty selection is the baseline's own computation: test_zero_units_give_the_baseline_exactly)
    checked = [c for c in plan if c.control == "none" or (c.control == "selected" and c.size)
               or (c.control, c.seed, c.method, c.ablated_label) == ("random", 1, "lape", "en")]
    for config in checked:
        rows = per_context.filter((pl.col("method") == config.method) & (pl.col("ablated_label") == config.ablated_label)
                                  & (pl.col("control") == config.control) & (pl.col("seed") == config.seed))
        with deactivated(sites, config.units):
            expected = [alone_nll(model, ids[c]) for c in rows["context_id"]]
        np.testing.assert_allclose(rows["nll"].to_numpy(), expected, rtol=2e-5, atol=2e-5,
                                   err_msg=f"{config.method} {config.ablated_label} {config.control} {config.seed}")
    # The selections do change the text's NLL (so the comparison above is not vacuous).
    own = per_context.filter((pl.col("method") == "lape") & (pl.col("ablated_label") == "en")
                             & (pl.col("control") == "selected"))["nll"].to_numpy()
    assert not np.allclose(own, per_context.filter(pl.col("control") == "none")["nll"].to_numpy(), rtol=0, atol=1e-7)


def test_selected_units_are_exactly_zero_during_the_pass(per_context, plan):
    touched = {point for c in plan for point in c.units}
    assert set(Probed.checked) == touched
    assert all(Probed.checked[point] > 0 for point in touched)
    # Rows of other configurations at the same point keep nonzero values there.
    assert set(Probed.nonzero_elsewhere) == touched


def test_zero_units_give_the_baseline_exactly(per_context):
    baseline = per_context.filter(pl.col("control") == "none").sort("context_id")
    empty = per_context.filter((pl.col("method") == "lape") & (pl.col("ablated_label") == "de"))
    assert (empty["units"] == 0).all() and set(empty["control"]) == {"selected", "random"}
    for _, group in empty.group_by("control", "seed"):
        assert np.array_equal(group.sort("context_id")["nll"].to_numpy(), baseline["nll"].to_numpy())


def test_random_controls_match_the_selection(smollm2, label_units, plan):
    model, _ = smollm2
    sites = MlpSites(model)
    widths = {site: sites.width(site) for site in sites.available}
    for (method, label), chosen in SELECTIONS.items():
        controls = [c for c in plan if (c.method, c.ablated_label, c.control) == (method, label, "random")]
        assert [c.seed for c in controls] == list(SEEDS)
        for control in controls:
            assert {p: len(u) for p, u in control.units.items()} == {p: len(u) for p, u in chosen.items()}
            for point, ids in control.units.items():
                assert not set(ids) & set(chosen[point]) and all(0 <= u < widths[point[0]] for u in ids)
        assert controls[0].units != controls[1].units
    again = lp.configurations(label_units, METHODS, ["de", "en"], SEEDS, widths)
    assert again == plan
    # A label's draws do not depend on which other labels there are.
    alone = lp.configurations(label_units.filter(pl.col("label") == "en"), METHODS, ["en"], SEEDS, widths)
    assert alone[1:] == [c for c in plan if c.ablated_label == "en"]


def exact_sign_flip(d: np.ndarray) -> float:
    observed = abs(d.mean())
    means = [abs((np.array(signs) * d).mean()) for signs in itertools.product((-1, 1), repeat=d.size)]
    return float(np.mean(np.array(means) >= observed * (1 - 1e-12)))


def test_sign_flip_p_value_against_enumeration():
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 6):
        d = rng.normal(0.3, 1, n)
        assert lp.sign_flip_p_value(d, 2000, np.random.default_rng(0)) == pytest.approx(exact_sign_flip(d))
    d = rng.normal(0.4, 1, 13)
    monte_carlo = lp.sign_flip_p_value(d, 4000, np.random.default_rng(0))
    assert monte_carlo == pytest.approx(exact_sign_flip(d), abs=0.03)
    assert lp.sign_flip_p_value(np.zeros(5), 2000, np.random.default_rng(0)) == 1.0


def weighted_perplexity(nll, tokens):
    return np.exp(np.sum(nll * tokens) / np.sum(tokens))


def test_summary_equals_a_numpy_recomputation(per_context, tmp_path):
    path = tmp_path / "perplexity_contexts.parquet"
    write_table(per_context, path, tables.LABEL_PERPLEXITY_CONTEXTS)
    frame = pl.read_parquet(path)
    summary = lp.summary_table(frame, RESAMPLES, 0.9, 0.05, 11)
    assert summary.height == len(METHODS) * 2 * 2
    base = {c: n for c, n in frame.filter(pl.col("control") == "none").select("context_id", "nll").iter_rows()}
    p_values = []
    for row in summary.iter_rows(named=True):
        cell = frame.filter((pl.col("method") == row["method"]) & (pl.col("ablated_label") == row["ablated_label"])
                            & (pl.col("eval_label") == row["eval_label"]))
        selected = cell.filter(pl.col("control") == "selected").sort("context_id")
        ids = selected["context_id"].to_numpy()
        tokens = selected["tokens"].to_numpy().astype(float)
        baseline = np.array([base[c] for c in ids])
        random = np.stack([cell.filter((pl.col("control") == "random") & (pl.col("seed") == s))
                           .sort("context_id")["nll"].to_numpy() for s in SEEDS])
        d = selected["nll"].to_numpy() - random.mean(0)
        assert row["units"] == sum(len(u) for u in SELECTIONS.get((row["method"], row["ablated_label"]), {}).values())
        assert row["contexts"] == PER_LABEL and row["tokens"] == tokens.sum()
        ppl = weighted_perplexity(baseline, tokens)
        assert row["baseline_perplexity"] == pytest.approx(ppl, rel=1e-12)
        assert row["selected_ratio"] == pytest.approx(weighted_perplexity(selected["nll"].to_numpy(), tokens) / ppl,
                                                      rel=1e-12)
        assert row["random_ratio"] == pytest.approx(np.mean([weighted_perplexity(r, tokens) for r in random]) / ppl,
                                                    rel=1e-12)
        assert row["excess"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-15)
        # The bootstrap: the same seeded stream, resampled contexts, percentile interval.
        rng = np.random.default_rng([11, zlib.crc32(repr((row["method"], row["ablated_label"],
                                                          row["eval_label"])).encode())])
        means = d[rng.integers(0, d.size, size=(RESAMPLES, d.size))].mean(1)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])), rel=1e-12)
        expected_p = 1.0 if not d.any() else exact_sign_flip(d)  # 2^2 sign patterns: exact
        assert row["p_value"] == pytest.approx(expected_p)
        p_values.append(expected_p)
        if row["units"] == 0:
            assert np.isnan(row["excess_per_unit"]) and row["excess"] == 0 and row["selected_ratio"] == 1
            assert row["random_ratio"] == 1 and row["p_value"] == 1
        else:
            assert row["excess_per_unit"] == pytest.approx(d.mean() / row["units"], rel=1e-12)
    q = scipy.stats.false_discovery_control(p_values)
    np.testing.assert_allclose(summary["q_value"].to_numpy(), q, rtol=1e-12)
    assert summary["significant"].to_list() == list(q < 0.05)


def test_bad_label_units_are_named(smollm2, contexts, label_units):
    model, _ = smollm2
    cases = [
        (label_units.with_columns(label=pl.lit("fr")), "label 'fr' is not one of the corpus's labels"),
        (label_units.with_columns(method=pl.lit("mean")), "method 'mean' is not one of"),
        (label_units.with_columns(unit=pl.lit(1536, pl.Int32)), "unit 1536 out of range for site"),
        (label_units.with_columns(layer=pl.lit(30, pl.Int32)), "layer 30 out of range"),
        (pl.concat([label_units, label_units.head(1)]), "listed twice"),
    ]
    for units, message in cases:
        with pytest.raises(NeuronmapError, match=message):
            lp.label_perplexity(model, contexts, units, METHODS, PER_LABEL, SEEDS, sources=("c.parquet", "u.parquet"))
    with pytest.raises(NeuronmapError, match="no held-out contexts"):
        lp.label_perplexity(model, contexts.with_columns(heldout=pl.lit(False)), label_units, METHODS, PER_LABEL,
                            SEEDS)


@pytest.mark.e2e  # the job's command as a process, the model loaded anew: make test only
def test_command_end_to_end(smollm2_dir, contexts, tmp_path):
    contexts_path, units_path = tmp_path / "contexts.parquet", tmp_path / "label_units.parquet"
    write_table(contexts, contexts_path, tables.CONTEXTS)
    write_table(units_table({("lape", "en"): {("up", 2): [4, 9]}, ("lape", "de"): {("down", 7): [1]}}),
                units_path, tables.LABEL_UNITS)
    defaults = PerplexitySettings.defaults(ap=False, contexts=1, seeds=(3,))
    settings = dataclasses.replace(defaults, model=dataclasses.replace(defaults.model, device="cpu", dtype="float32"),
                                   significance=dataclasses.replace(defaults.significance, bootstrap_resamples=100))
    out_contexts, out = tmp_path / "perplexity_contexts.parquet", tmp_path / "perplexity.parquet"
    result = subprocess.run([sys.executable, "-m", "neuronmap", "label-perplexity", "--settings", settings.to_json(),
                             "--model-dir", str(smollm2_dir), "--contexts", str(contexts_path), "--units",
                             str(units_path), "--threads", "1", "--out-contexts", str(out_contexts), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pq.read_schema(out_contexts).remove_metadata() == tables.LABEL_PERPLEXITY_CONTEXTS
    assert pq.read_schema(out).remove_metadata() == tables.LABEL_PERPLEXITY
    per_context, summary = pl.read_parquet(out_contexts), pl.read_parquet(out)
    assert per_context.height == (1 + 2 * 2) * 2  # baseline, 2 labels x (selection + 1 seed); 1 context per label
    assert sorted(summary.select("ablated_label", "eval_label").rows()) == \
        [("de", "de"), ("de", "en"), ("en", "de"), ("en", "en")]
    assert set(summary["method"]) == {"lape"} and summary["units"].to_list() == [1, 1, 2, 2]
    assert "lape en: 2 units" in result.stderr
