"""What the explain stage asks of its text models, per unit, before it runs: the explainer's
prompt and answer tokens and the scorer's, from the explain settings and the prompt templates,
and the time at the configured rate (docs/explain.md works the same sums for a 70B explainer).

Per unit the explainer reads one prompt (the template and `top_examples` + `quantile_examples`
excerpts of 2 * `window` + 1 tokens, the highlighted ones marked) and writes up to `max_tokens`;
the scorer reads, for each of the three descriptions (the model's, the baseline's, the shuffled
control's), up to 2 * `score_contexts` prompts (the template, one excerpt and the description)
and writes one token each."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# Chat-template wrapping (role markers, default system prompt) around every conversation, and the
# markers around highlighted tokens: measured with the embedded model's template, rounded up.
CHAT_OVERHEAD_TOKENS = 40
MARKED_TOKENS_PER_EXCERPT = 4
CHARACTERS_PER_TOKEN = 4  # where no tokenizer counts (English prose; more tokens for other scripts)


def template_tokens(path: str | None, default: str, tokenizer=None) -> int:
    """Tokens of a prompt template's text without its placeholders' contents (the explain
    stage's own template where `path` is null: package data, read, not imported)."""
    text = (Path(path).read_text() if path else
            resources.files("neuronmap").joinpath("explain", "prompts", default).read_text())
    text = text.replace("---", "")
    return len(tokenizer(text)["input_ids"]) if tokenizer is not None else -(-len(text) // CHARACTERS_PER_TOKEN)


def explain_cost(explain: dict, parameters: int, tflops: float, tokenizer=None) -> dict:
    """Per unit: tokens in and out of the explainer and the scorer, and seconds at
    `explain.tokens_per_second` where set, else at `plan.tflops` with a model of `parameters`
    (the run's own, what the local backends use: 2 FLOPs per parameter and token)."""
    excerpt = 2 * explain["window"] + 1
    shown = explain["top_examples"] + explain["quantile_examples"]
    explainer_in = (CHAT_OVERHEAD_TOKENS + template_tokens(explain["prompt_template"], "explain.txt", tokenizer)
                    + shown * (excerpt + MARKED_TOKENS_PER_EXCERPT))
    explainer_out = explain["max_tokens"]
    score_prompts = 3 * 2 * explain["score_contexts"]
    scorer_in = score_prompts * (CHAT_OVERHEAD_TOKENS + excerpt + explainer_out
                                 + template_tokens(explain["score_template"], "score.txt", tokenizer))
    tokens = explainer_in + explainer_out + scorer_in + score_prompts
    rate = explain.get("tokens_per_second") or tflops * 1e12 / (2.0 * parameters)
    return {"explainer_prompt_tokens": explainer_in, "explainer_completion_tokens": explainer_out,
            "scorer_prompts": score_prompts, "scorer_prompt_tokens": scorer_in, "scorer_completion_tokens": score_prompts,
            "tokens_per_second": rate, "seconds_per_unit": tokens / rate,
            "rate_from": "explain.tokens_per_second" if explain.get("tokens_per_second") else "plan.tflops"}
