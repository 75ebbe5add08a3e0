"""Per-row deactivation (several ablation configurations in one batch) against one configuration
at a time, on a tiny random Llama: a row under a mask must see exactly what a single-configuration
deactivated run sees, and rows without a mask exactly the unmodified model."""

import numpy as np
import pytest
import torch

from neuronmap.model.architectures import MlpSites
from neuronmap.model.deactivation import Deactivation, RowDeactivation, deactivated

CONFIGS = [
    Deactivation.constant({("gate", 1): [1, 5, 17], ("act", 2): [3]}),
    Deactivation.constant({("up", 0): [7], ("down", 2): [4, 30]}, value=0.75),
    Deactivation.constant({}),  # the baseline row
    Deactivation.per_unit({("act", 1): [0, 9], ("gate", 1): [5]},
                          {("act", 1): np.linspace(-1, 1, 48), ("gate", 1): np.linspace(2, 3, 48)}),
]


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(1, 97, (2, 9))


def single_run(model, config: Deactivation, input_ids, **generate):
    """The reference: one configuration for the whole batch, through plain forward hooks that set
    each unit to its own value (independent of RowDeactivation)."""
    sites = MlpSites(model)
    handles = []
    for point, ids in config.units.items():
        site_point = sites.point(*point)
        index = torch.as_tensor(ids)
        values = torch.as_tensor(config.values[point])

        def write(module, args, output=None, index=index, values=values, is_input=site_point.is_input):
            x = args[0] if is_input else output
            x[..., index] = values.to(x.dtype)
        handles.append(site_point.module.register_forward_pre_hook(write) if site_point.is_input
                       else site_point.module.register_forward_hook(write))
    try:
        with torch.inference_mode():
            if generate:
                return model.generate(input_ids, do_sample=False, pad_token_id=0, **generate)
            return model(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def row_run(model, configs, input_ids, **generate):
    masks = RowDeactivation(MlpSites(model), configs)
    rows = torch.arange(len(configs)).repeat_interleave(input_ids.shape[0])
    with masks.installed(), torch.inference_mode():
        masks.set_rows(rows)
        repeated = input_ids.repeat(len(configs), 1)
        if generate:
            return model.generate(repeated, do_sample=False, pad_token_id=0, **generate)
        return model(repeated).logits


def test_each_row_matches_its_single_configuration_run(tiny_llama, input_ids):
    batched = row_run(tiny_llama, CONFIGS, input_ids)
    n = input_ids.shape[0]
    plain = single_run(tiny_llama, Deactivation.constant({}), input_ids)
    for c, config in enumerate(CONFIGS):
        expected = single_run(tiny_llama, config, input_ids)
        torch.testing.assert_close(batched[c * n:(c + 1) * n], expected, rtol=1e-5, atol=1e-6)
        if config.size():
            assert not torch.allclose(expected, plain)  # the configuration does change the output
    torch.testing.assert_close(batched[2 * n:3 * n], plain, rtol=1e-5, atol=1e-6)  # no mask: baseline


def test_generation_keeps_each_rows_mask_for_generated_tokens(tiny_llama, input_ids):
    batched = row_run(tiny_llama, CONFIGS, input_ids, max_new_tokens=4)
    n = input_ids.shape[0]
    for c, config in enumerate(CONFIGS):
        expected = single_run(tiny_llama, config, input_ids, max_new_tokens=4)
        assert torch.equal(batched[c * n:(c + 1) * n], expected), f"configuration {c}"


def test_mask_changes_exactly_the_masked_units_of_the_masked_rows(tiny_llama, input_ids):
    """Probe gate layer 1 (after the masks, hooks run in order of registration) at every step of
    generation: configuration 0 zeroes units 1, 5, 17; configuration 3 sets unit 5 to 2 + 5/47;
    every other value equals the unmodified model's."""
    sites = MlpSites(tiny_llama)
    point = sites.point("gate", 1)
    seen = []
    masks = RowDeactivation(sites, CONFIGS)
    n = input_ids.shape[0]
    with masks.installed():
        handle = point.module.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        try:
            masks.set_rows(torch.arange(len(CONFIGS)).repeat_interleave(n))
            with torch.inference_mode():
                tiny_llama.generate(input_ids.repeat(len(CONFIGS), 1), max_new_tokens=3, do_sample=False,
                                    pad_token_id=0)
        finally:
            handle.remove()
    assert len(seen) == 3  # the prompt, then one step per generated token after the first
    for step in seen:
        assert torch.all(step[0:n, :, [1, 5, 17]] == 0)
        assert torch.all(step[3 * n:4 * n, :, 5] == np.float32(np.linspace(2, 3, 48)[5]))
    # Untouched units of masked rows equal the baseline row's on the prompt (same tokens, same
    # history up to this layer's input, which only earlier masks can change: none for row block 0
    # before gate layer 1 since its masks sit at gate 1 and act 2).
    prompt = seen[0]
    others = [u for u in range(48) if u not in (1, 5, 17)]
    torch.testing.assert_close(prompt[0:n, :, others], prompt[2 * n:3 * n, :, others], rtol=1e-6, atol=1e-7)


def test_rows_must_match_the_batch_and_hooks_are_removed(tiny_llama, input_ids):
    masks = RowDeactivation(MlpSites(tiny_llama), CONFIGS)
    with pytest.raises(RuntimeError, match="row configurations"):
        with masks.installed(), torch.inference_mode():
            masks.set_rows([0])
            tiny_llama(input_ids)
    with pytest.raises(ValueError, match="configuration index out of range"):
        masks.set_rows([0, 4])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_llama.modules())


def test_out_of_range_unit_is_rejected_before_any_hook(tiny_llama):
    with pytest.raises(ValueError, match="out of range for up layer 0"):
        RowDeactivation(MlpSites(tiny_llama), [Deactivation.constant({("up", 0): [48]})])


def test_single_configuration_context_agrees_with_row_masks(tiny_llama, input_ids):
    config = CONFIGS[0]
    with deactivated(MlpSites(tiny_llama), config.units), torch.inference_mode():
        expected = tiny_llama(input_ids).logits
    torch.testing.assert_close(row_run(tiny_llama, [config], input_ids), expected, rtol=1e-5, atol=1e-6)
