"""Detection scoring (delphi): a scorer judges each held-out excerpt against a description; the
unit's score is how well those judgements separate its activating excerpts from the
non-activating ones: balanced accuracy of the yes/no answers (so the mix of the two does not
matter), and the AUC of the scorer's probability of "yes" where it gives one. A small model that
answers "no" to everything has a balanced accuracy of 0.5 whatever it reads, while the odds it
gives "yes" may still rank the excerpts; the AUC reads that ranking."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .backends import TextModel
from .examples import Excerpt
from .explainers import conversation


@dataclass(frozen=True)
class Judgement:
    match: bool
    probability: float  # of a match: the scorer's odds of "yes", or 1.0 / 0.0 where it gives none


class Scorer(Protocol):
    name: str

    def judge(self, explanation: str, excerpts: list[Excerpt]) -> list[Judgement]: ...


QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|<<(.+?)>>')


def quoted_tokens(explanation: str) -> set[str]:
    return {next(g for g in m.groups() if g).strip().lower() for m in QUOTED.finditer(explanation)} - {""}


class TokenScorer:
    """Model-free and deterministic: an excerpt matches when one of its tokens (stripped, any
    case) is a token the description quotes in double quotes."""

    name = "tokens"

    def judge(self, explanation: str, excerpts: list[Excerpt]) -> list[Judgement]:
        wanted = quoted_tokens(explanation)
        matches = [any(t.strip().lower() in wanted for t in ex.tokens) for ex in excerpts]
        return [Judgement(m, float(m)) for m in matches]


# Alternatives of the first answer token asked for: enough to hold "yes" and "no" in their casings.
LOGPROBS = 20


class ModelScorer:
    """A text model asked, excerpt by excerpt, whether the text matches (max_tokens 1, greedy):
    an answer starting with "yes" is a match, anything else is not. The probability of a match is
    P(yes) / (P(yes) + P(no)) over the first token's likeliest alternatives (any casing, spaces
    stripped), where the backend gives them."""

    def __init__(self, model: TextModel, template: tuple[str, str]):
        self.model, self.template, self.name = model, template, model.name
        self.prompt_tokens = self.completion_tokens = 0

    def judge(self, explanation: str, excerpts: list[Excerpt]) -> list[Judgement]:
        if not excerpts:
            return []
        conversations = [conversation(self.template, explanation=explanation, text=ex.text(highlight=False))
                         for ex in excerpts]
        answers = self.model.complete(conversations, max_tokens=1, logprobs=LOGPROBS)
        self.prompt_tokens += sum(a.prompt_tokens for a in answers)
        self.completion_tokens += sum(a.completion_tokens for a in answers)
        judgements = []
        for a in answers:
            match = a.text.strip().lower().startswith("yes")
            judgements.append(Judgement(match, yes_probability(a.top_logprobs, match)))
        return judgements


def yes_probability(alternatives: tuple[tuple[str, float], ...] | None, match: bool) -> float:
    yes = no = 0.0
    for token, logprob in alternatives or ():
        word = token.strip().lower()
        if word == "yes":
            yes += math.exp(logprob)
        elif word == "no":
            no += math.exp(logprob)
    return yes / (yes + no) if yes + no > 0 else float(match)


@dataclass(frozen=True)
class Detection:
    contexts: int
    activating: int
    true_positive_rate: float
    true_negative_rate: float
    balanced_accuracy: float
    auc: float


def detection(active: list[Judgement], quiet: list[Judgement]) -> Detection:
    """Judgements of the activating and non-activating excerpts -> the rates (NaN without any of
    a kind: both scores need both)."""
    tpr = float(np.mean([j.match for j in active])) if active else math.nan
    tnr = 1.0 - float(np.mean([j.match for j in quiet])) if quiet else math.nan
    auc = rank_auc([j.probability for j in active], [j.probability for j in quiet])
    return Detection(len(active) + len(quiet), len(active), tpr, tnr, (tpr + tnr) / 2, auc)


def rank_auc(positive: list[float], negative: list[float]) -> float:
    """The probability that an activating excerpt gets a higher score than a non-activating one,
    ties counting half (Mann-Whitney). With yes/no scores it equals the balanced accuracy."""
    if not positive or not negative:
        return math.nan
    p, n = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return float(np.mean((p > n) + 0.5 * (p == n)))


def score(scorer: Scorer, explanation: str, active: list[Excerpt], quiet: list[Excerpt]) -> Detection:
    judged = scorer.judge(explanation, active + quiet)
    return detection(judged[:len(active)], judged[len(active):])


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (Sattolo's algorithm: one random
    cycle), so each unit's control is another unit's explanation. n < 2: none exists."""
    if n < 2:
        return list(range(n))
    rng = np.random.default_rng(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm
