"""The explainers: a model-free baseline from the unit's peak tokens and their neighbours, and a
text model prompted with the unit's highlighted excerpts (the template a user can change)."""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources
from pathlib import Path

from ..errors import NeuronmapError
from .examples import Excerpt

# Peak tokens and neighbouring words the baseline quotes.
BASELINE_TOKENS, BASELINE_NEIGHBOURS = 3, 2


def baseline_explanation(shown: list[Excerpt]) -> str:
    """What the records say, in words: the tokens that most often carry the peak among the shown
    contexts (as corpus/peak_tokens.parquet counts them, on the explain half only) and the words
    most often around them."""
    peaks, around = Counter(), Counter()
    for ex in shown:
        peak = max(range(len(ex.tokens)), key=lambda k: (ex.active[k], -abs(k - len(ex.tokens) // 2)))
        word = ex.tokens[peak].strip()
        if word:
            peaks[word] += 1
        around.update({t.strip() for k, t in enumerate(ex.tokens) if k != peak and len(t.strip()) > 1
                       and any(c.isalnum() for c in t)})
    quoted = [w for w, _ in peaks.most_common(BASELINE_TOKENS)]
    if not quoted:
        return "no clear pattern"
    near = [w for w, c in around.most_common() if w not in quoted and c > 1][:BASELINE_NEIGHBOURS]
    text = "the tokens " + ", ".join(f'"{w}"' for w in quoted)
    return text + (" near " + ", ".join(f'"{w}"' for w in near) if near else "")


def load_template(path: str | None, shipped: str) -> tuple[str, ...]:
    """The parts of a template file, between lines `---`: the system message, then turns that
    alternate user, assistant, user, ... (examples of the answer wanted), the last one the user's."""
    if path is None:
        text = resources.files("neuronmap.explain").joinpath("prompts", shipped).read_text(encoding="utf-8")
        where = f"the shipped {shipped}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise NeuronmapError(f"explain: template {path}: {exc.strerror}") from None
        where = path
    parts = tuple(part.strip() for part in re.split(r"\n---\n", text))
    if len(parts) < 2 or len(parts) % 2:
        raise NeuronmapError(f"explain: template {where} needs a system part and user/assistant turns ending "
                             "with the user's, separated by lines '---'")
    return parts


def conversation(template: tuple[str, ...], **fields: str) -> list[dict[str, str]]:
    """The template's messages with each {field} of the last (the user's) filled in."""
    *fixed, user = template
    for name, value in fields.items():
        user = user.replace("{" + name + "}", value)
    roles = ["system"] + ["user", "assistant"] * (len(fixed) // 2)
    return [{"role": r, "content": c} for r, c in zip(roles, fixed)] + [{"role": "user", "content": user}]


def explain_conversation(template: tuple[str, str], shown: list[Excerpt]) -> list[dict[str, str]]:
    examples = "\n".join(f"{k}. {ex.text(highlight=True)}" for k, ex in enumerate(shown, 1))
    return conversation(template, examples=examples)


def clean_explanation(text: str) -> str:
    """The explanation in an answer: its first non-empty line, without a leading label."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = re.sub(r"^(explanation|answer|the neuron responds to)\s*:\s*", "", line, flags=re.I)
    return line or "no explanation"
