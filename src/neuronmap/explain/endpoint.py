"""The `endpoint` text model: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server,
`transformers serve`), asked over HTTP with the standard library alone.

Each conversation is one POST to <url>/v1/chat/completions, greedy (temperature 0), several at a
time from a thread pool; the completions come back in the conversations' order. A connection error,
a timeout, a 5xx or a 429 (rate limit) is retried after a growing pause; any other 4xx is the
request's fault and fails at once with the server's own message. The request budget caps the
requests of a whole run (a cluster's endpoint may bill per token): a batch that would pass it is
refused before any of it is sent.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ..errors import NeuronmapError
from .backends import Completion

log = logging.getLogger("neuronmap")

RETRIED_STATUS = {408, 409, 425, 429}  # and every 5xx: the server's state, not the request's fault
MAX_PAUSE_S = 30.0


class EndpointError(NeuronmapError):
    """The endpoint did not answer, or refused, or the budget is spent."""


class EndpointModel:
    """A TextModel (backends.py) served over HTTP.

    url: the server, with or without /v1 (http://127.0.0.1:8000). model: the name the server
    knows the model by. concurrency: requests in flight at once. retries: further tries of a
    request that failed for the server's reasons. timeout_s: seconds one try may take. request_budget:
    requests this object may send in all (None: no limit). api_key_env: the environment variable
    holding the API key (None: no key), so that no key is written in a config file. where: the
    config section these come from, which the errors name (explain.explainer or explain.scorer).
    """

    def __init__(self, url: str, model: str, concurrency: int, retries: int, timeout_s: float,
                 request_budget: int | None = None, api_key_env: str | None = None, backoff_s: float = 1.0,
                 where: str = "explain.<explainer|scorer>"):
        base = url.rstrip("/")
        self.endpoint = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model = self.name = model  # the scores table names the scorer by it
        self.concurrency, self.retries, self.timeout_s = max(1, concurrency), max(0, retries), timeout_s
        self.request_budget, self.backoff_s, self.where = request_budget, backoff_s, where
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EndpointError(f"{where}.api_key_env: the environment variable {api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        self.requests = 0  # sent so far, retries not counted: what the budget limits
        self._lock = threading.Lock()

    def complete(self, conversations: list[list[dict[str, str]]], max_tokens: int,
                 logprobs: int = 0) -> list[Completion]:
        with self._lock:
            if self.request_budget is not None and self.requests + len(conversations) > self.request_budget:
                raise EndpointError(
                    f"{self.where}.request_budget: {self.request_budget} requests allowed, {self.requests} sent, "
                    f"{len(conversations)} more asked; raise the budget to go on")
            self.requests += len(conversations)
        if not conversations:
            return []
        pool = ThreadPoolExecutor(min(self.concurrency, len(conversations)), thread_name_prefix="endpoint")
        try:
            return list(pool.map(lambda messages: self._ask(messages, max_tokens, logprobs), conversations))
        finally:
            # On an error, the requests not yet started are dropped; those in flight end by their timeout.
            pool.shutdown(wait=True, cancel_futures=True)

    def _ask(self, messages: list[dict[str, str]], max_tokens: int, logprobs: int = 0) -> Completion:
        request_fields = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                          "temperature": 0, "stream": False}
        if logprobs > 0:  # vLLM and SGLang answer; transformers serve ignores them (the text stays)
            request_fields |= {"logprobs": True, "top_logprobs": logprobs}
        body = json.dumps(request_fields).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.endpoint, data=body, headers=self.headers, method="POST")
            pause = self.backoff_s * 2 ** attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _completion(json.loads(response.read()), self.endpoint)
            except urllib.error.HTTPError as error:
                detail = _detail(error)
                if error.code not in RETRIED_STATUS and error.code < 500:
                    raise EndpointError(f"{self.endpoint}: HTTP {error.code}: {detail}") from None
                problem = f"HTTP {error.code}: {detail}"
                pause = max(pause, _retry_after(error))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, reset, timeout
                reason = getattr(error, "reason", error)
                timed_out = isinstance(reason, (socket.timeout, TimeoutError))
                problem = (f"no answer within {self.timeout_s} s ({self.where}.timeout_s)" if timed_out
                           else f"connection failed: {reason}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = "the answer is not JSON"
            if attempt < self.retries:
                log.warning("%s: %s; try %d of %d in %.1f s", self.endpoint, problem, attempt + 2, self.retries + 1,
                            min(pause, MAX_PAUSE_S))
                time.sleep(min(pause, MAX_PAUSE_S))
        raise EndpointError(f"{self.endpoint}: {problem} (after {self.retries + 1} tries; {self.where}.retries is "
                            f"{self.retries})")


def _completion(answer: dict, endpoint: str) -> Completion:
    """The text and the token counts of a chat completion (counts 0 where a server leaves out usage)."""
    try:
        text = answer["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{endpoint}: not a chat completion: {json.dumps(answer)[:300]}") from None
    usage = answer.get("usage") or {}
    return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      top_logprobs=_first_top_logprobs(answer["choices"][0]))


def _first_top_logprobs(choice: dict) -> tuple[tuple[str, float], ...] | None:
    """OpenAI's choices[0].logprobs.content[0].top_logprobs; None where the server gave none."""
    try:
        first = choice["logprobs"]["content"][0]["top_logprobs"]
        return tuple((str(alt["token"]), float(alt["logprob"])) for alt in first) or None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's own message: OpenAI's {"error": {"message": ...}}, else the body's start."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        payload = json.loads(raw)
        inner = payload.get("error", payload.get("detail", payload)) if isinstance(payload, dict) else payload
        message = inner.get("message", inner) if isinstance(inner, dict) else inner
        return str(message)[:500]
    except json.JSONDecodeError:
        return raw[:500]


def _retry_after(error: urllib.error.HTTPError) -> float:
    """Seconds a 429 or 503 asks the client to wait (Retry-After in seconds; 0 when absent)."""
    try:
        return float(error.headers.get("Retry-After", 0))
    except (TypeError, ValueError):
        return 0.0
