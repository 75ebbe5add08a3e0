"""Each supported MLP family on a tiny randomly initialized model (no download): the hooks
read the right tensors and deactivation zeroes the right units."""

import pytest
import torch

from neuronmap.model.architectures import MlpSites
from neuronmap.model.deactivation import deactivated
from neuronmap.errors import NeuronmapError
from neuronmap.model.hooks import pooled_responses


def tiny(model_type):
    import transformers as tf
    torch.manual_seed(0)
    common = dict(vocab_size=101, max_position_embeddings=64)
    if model_type in ("llama", "mistral", "qwen2", "gemma"):
        config_class = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
                        "gemma": tf.GemmaConfig}[model_type]
        config = config_class(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, **common)
    elif model_type == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=101)
    elif model_type == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  **common)
    elif model_type == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, **common)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    for parameter in model.parameters():  # random biases too, so a zero is never an accident
        torch.nn.init.normal_(parameter, std=0.2)
    return model


def manual(model, layer, x):
    """gate/up/act/down from the MLP's own modules, applied by hand to the MLP input x."""
    kind = model.config.model_type
    if kind == "gpt2":
        mlp = model.transformer.h[layer].mlp
        up = mlp.c_fc(x)
        act = mlp.act(up)
        return {"up": up, "act": act, "down": mlp.c_proj(act)}
    if kind == "gpt_neox":
        mlp = model.gpt_neox.layers[layer].mlp
        up = mlp.dense_h_to_4h(x)
        act = mlp.act(up)
        return {"up": up, "act": act, "down": mlp.dense_4h_to_h(act)}
    if kind == "opt":
        block = model.model.decoder.layers[layer]
        up = block.fc1(x)
        act = block.activation_fn(up)
        return {"up": up, "act": act, "down": block.fc2(act)}
    mlp = model.model.layers[layer].mlp
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    act = mlp.act_fn(gate) * up
    return {"gate": gate, "up": up, "act": act, "down": mlp.down_proj(act)}


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "opt"]


GATED = ["llama", "mistral", "qwen2", "gemma"]


@pytest.mark.parametrize("model_type, fused", [(family, False) for family in FAMILIES] +
                         [(family, True) for family in GATED])
def test_pooled_responses_match_a_manual_computation(model_type, fused):
    model = tiny(model_type)
    sites = MlpSites(model)
    input_ids = torch.randint(3, 101, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    attention_mask[2, 3:] = 0
    pooled = pooled_responses(model, sites, sites.available, "mean",
                              {"input_ids": input_ids, "attention_mask": attention_mask}, fused=fused)
    for layer in range(sites.n_layers):
        first = sites.point("up", layer).module
        for row in range(3):
            length = int(attention_mask[row].sum())
            seen = []
            # OPT feeds its MLP [tokens, features]; the others [batch, tokens, features]
            handle = first.register_forward_pre_hook(
                lambda module, args: seen.append((args[0][0] if args[0].dim() == 3 else args[0]).clone()))
            with torch.no_grad():
                model(input_ids=input_ids[row:row + 1, :length])
                handle.remove()
                expected = manual(model, layer, seen[0])
            for site in sites.available:
                torch.testing.assert_close(pooled[site][layer, row], expected[site].mean(0), rtol=1e-4, atol=1e-5,
                                           msg=f"{model_type} {site} layer {layer} row {row}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_deactivation_zeroes_exactly_the_chosen_units(model_type):
    model = tiny(model_type)
    sites = MlpSites(model)
    input_ids = torch.randint(3, 101, (2, 6))
    for site in sites.available:
        units = [0, 7] if site != "down" else [3]
        point = sites.point(site, 1)
        seen = []
        probe = (lambda module, args: seen.append(args[0].clone())) if point.is_input else \
            (lambda module, args, output: seen.append(output.clone()))
        def install():  # after the deactivation hook, so it sees what the layer passes on
            return (point.module.register_forward_pre_hook(probe) if point.is_input
                    else point.module.register_forward_hook(probe))
        with torch.no_grad():
            handle = install()
            plain = model(input_ids).logits
            handle.remove()
            with deactivated(sites, {(site, 1): units}):
                handle = install()
                ablated = model(input_ids).logits
                handle.remove()
        before, after = seen
        others = [u for u in range(point.width) if u not in units]
        assert torch.all(after[..., units] == 0) and torch.any(before[..., units] != 0), (model_type, site)
        assert torch.equal(after[..., others], before[..., others]), (model_type, site)
        assert not torch.equal(plain, ablated)


def test_gate_is_not_a_site_of_an_ungated_mlp():
    with pytest.raises(NeuronmapError, match="gate not available"):
        MlpSites(tiny("gpt2")).check(["gate", "up"])


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gpt2", "gpt_neox", "opt"])
def test_final_norm_gain_and_weight_orientation_come_from_the_adapter(model_type):
    """decode asks architectures.py, and only it, for the final norm's gain and for each projection's
    weight as [out, in] (GPT-2's Conv1D stores it transposed): both checked against the modules' outputs."""
    from neuronmap.model import architectures
    from neuronmap.stats import decode
    assert decode.final_norm_gain is architectures.final_norm_gain
    assert decode.linear_weight is architectures.linear_weight
    model = tiny(model_type)
    sites = MlpSites(model)
    norm = architectures._get(model, sites.adapter.final_norm)
    gain = architectures.final_norm_gain(model)
    hidden = gain.shape[0]
    # x has zero mean and unit variance (and RMS): norm(x) = gain * x + bias, whatever the norm's kind
    x = torch.tensor([1.0, -1.0]).repeat(hidden // 2)
    with torch.no_grad():
        measured = (norm(x[None]) - norm(-x[None]))[0] / (2 * x)
    torch.testing.assert_close(gain, measured, rtol=1e-3, atol=1e-4)
    if model_type == "gemma":  # stored as weight - 1
        torch.testing.assert_close(gain, 1 + norm.weight)
    for name in ("up", "down"):
        module = sites.projection(name, 0)
        weight = architectures.linear_weight(module)
        n_in, n_out = architectures._features(module)
        assert weight.shape == (n_out, n_in), (model_type, name)
        x = torch.randn(3, n_in)
        with torch.no_grad():
            torch.testing.assert_close(module(x) - module(torch.zeros_like(x)), x @ weight.T, rtol=1e-4, atol=1e-5)
    if model_type == "gpt2":
        assert type(sites.projection("up", 0)).__name__ == "Conv1D"
