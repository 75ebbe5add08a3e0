"""The local text model: the chat template, greedy decoding, and batches that give each
conversation the text it gets alone."""

from __future__ import annotations

import pytest

from neuronmap.errors import NeuronmapError
from neuronmap.explain.backends import BackendSettings, LocalModel
from neuronmap.explain.textmodels import text_model


def test_local_model_batches_like_one_conversation_at_a_time(smollm2):
    """Left padding changes nothing a row attends to: the batched answers are the answers each
    conversation gets alone, and the lengths are the chat template's."""
    model, tokenizer = smollm2
    local = LocalModel(model, tokenizer, "smollm2", batch_size=3)
    conversations = [
        [{"role": "user", "content": "Say hello."}],
        [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "What is the capital of France? Then explain at length why it is."}],
        [{"role": "user", "content": "Count: one, two,"}],
    ]
    batched = local.complete(conversations, max_tokens=6)
    alone = [local.complete([c], max_tokens=6)[0] for c in conversations]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batched] == [len(local._prompt_ids(c)) for c in conversations]
    assert tokenizer.decode(local._prompt_ids(conversations[0])).endswith("<|im_start|>assistant\n")
    assert all(1 <= c.completion_tokens <= 6 for c in batched)
    # Greedy: what generate gives one conversation with no padding at all.
    import torch
    ids = torch.tensor([local._prompt_ids(conversations[0])])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert want.startswith(batched[0].text)


def test_factory_names_the_backends():
    with pytest.raises(NeuronmapError, match="explain.scorer: the endpoint backend needs url and model"):
        text_model(BackendSettings.defaults(backend="endpoint"), None, where="explain.scorer")
    with pytest.raises(NeuronmapError, match="unknown text model backend"):
        text_model(BackendSettings.defaults(backend="magic"), None)
