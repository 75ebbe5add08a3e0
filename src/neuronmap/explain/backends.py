"""Text models behind one interface: what explains a unit and what judges a description.

`local` runs any causal LM in-process through transformers (the run's embedded model by default);
`endpoint` (endpoint.py) asks an OpenAI-compatible server. Both decode greedily, so a table can be
rebuilt from the same model and prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("neuronmap")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # The first answer token's most likely alternatives, (token text, log-probability), where
    # asked for (`logprobs` > 0) and the backend gives them (a server may ignore the request).
    top_logprobs: tuple[tuple[str, float], ...] | None = None


class TextModel(Protocol):
    """Chat completion, greedy (temperature 0). A conversation is a list of messages
    {"role": "system" | "user" | "assistant", "content": str}; one Completion per conversation,
    in order."""

    name: str

    def complete(self, conversations: list[list[dict[str, str]]], max_tokens: int,
                 logprobs: int = 0) -> list[Completion]: ...


@dataclass(frozen=True)
class BackendSettings:
    """One text model of the config (`explain.explainer`, `explain.scorer`): which backend, and for
    `local` which model (null: the run's own), for `endpoint` where and how hard to ask."""

    backend: str
    model: str | None
    url: str | None
    concurrency: int
    retries: int
    timeout_s: float
    request_budget: int | None
    api_key_env: str | None

    @classmethod
    def from_mapping(cls, values: dict) -> "BackendSettings":
        return cls(**values)

    @classmethod
    def defaults(cls, role: str = "explainer", **changes) -> "BackendSettings":
        """The schema's `explain.<role>`, with `changes` (tests start here)."""
        from ..config.schema import defaults
        return cls(**{**defaults()["explain"][role], **changes})


class LocalModel:
    """A causal LM in-process through transformers: the chat template with the generation prompt,
    greedy decoding, conversations batched with left padding (so every row's answer starts at the
    same column). Padding changes nothing a row attends to, so a batch gives each conversation the
    text its greedy decoding alone gives (up to float rounding; tests/test_explain_backends.py)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(tokenizer, "chat_template", None) is None:
            from ..errors import NeuronmapError
            raise NeuronmapError(f"explain: model {name} has no chat template (an instruction-tuned model is needed)")

    def _prompt_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def complete(self, conversations: list[list[dict[str, str]]], max_tokens: int,
                 logprobs: int = 0) -> list[Completion]:
        import torch
        prompts = [self._prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # similar lengths pad little
        results: dict[int, Completion] = {}
        device = self.model.get_input_embeddings().weight.device
        pad = self.tokenizer.pad_token_id
        stops = {self.tokenizer.eos_token_id, *self._end_ids()}
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows],
                                device=device)
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                          do_sample=False, num_beams=1, pad_token_id=pad,
                                          eos_token_id=sorted(i for i in stops if i is not None),
                                          temperature=None, top_p=None, top_k=None,
                                          output_scores=logprobs > 0, return_dict_in_generate=True)
            alternatives = self._top_logprobs(out.scores[0], logprobs) if logprobs > 0 else [None] * len(rows)
            for row, i in enumerate(rows):
                new = out.sequences[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                text = self.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
                results[i] = Completion(text, len(prompts[i]), min(cut + 1, len(new)) if cut < len(new) else len(new),
                                        alternatives[row])
        return [results[i] for i in range(len(prompts))]

    def _top_logprobs(self, logits, k: int) -> list[tuple[tuple[str, float], ...]]:
        """Per row, the k likeliest first tokens, decoded as a server decodes them."""
        import torch
        values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return [tuple((self.tokenizer.decode([t]), float(v)) for t, v in zip(row_ids, row_values))
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]

    def _end_ids(self) -> list[int]:
        """Tokens that end an assistant turn besides eos (`<|im_end|>`, `<|eot_id|>`, ...)."""
        found = []
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                found.append(token_id)
        return found
