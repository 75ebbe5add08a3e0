"""The `endpoint` text model against a real OpenAI-compatible server started here: `transformers
serve` with the embedded model (offline, CPU, float32) on a free port. Greedy completions equal
the model's own generate() in this process and the local backend's, token counts included; the
explain stage's tables through the server equal those in process (make test only); then the
budget, a timeout (a server that never answers), retries (a server that answers 429 and 503
first) and a stopped server, which fails with a clear error after its retries."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest
import torch

from neuronmap.explain.endpoint import EndpointError, EndpointModel

from conftest import REPO

START_TIMEOUT_S = 180  # its start took 17 s on 2 cores at load 6, 28-34 s at load 10-13
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You describe neurons of a language model in a few words."},
     {"role": "user", "content": "A unit fires on: ' Paris', ' Berlin', ' Rome'. What does it respond to?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Continue: one, two, three,"}],
]
MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    """`transformers serve <model dir>` as a process: (base URL, model name, process)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
               str(smollm2_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    # One thread: on a loaded machine, torch's one per core made each request ten times slower.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # its own group: the model's process goes with it
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited ({process.returncode}):\n{log_path.read_text()[-5000:]}")
            if time.monotonic() - start > START_TIMEOUT_S:
                pytest.fail(f"transformers serve not ready in {START_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        logging.getLogger(__name__).info("transformers serve ready in %.1f s", time.monotonic() - start)
        yield url, str(smollm2_dir), process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def in_process(smollm2_dir):
    """The same model in this process, float32: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.fixture
def one_thread():
    """One torch thread, as the server (see its fixture): ten times faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(model, tokenizer, conversations, max_tokens):
    """Greedy generation with transformers' generate(), one conversation at a time (no padding):
    (text, prompt tokens, completion tokens)."""
    out = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:]
        out.append((tokenizer.decode(generated, skip_special_tokens=True), ids.shape[1], len(generated)))
    return out


@pytest.mark.e2e  # starts `transformers serve` (30-60 s with the model's preparation): make test only
def test_endpoint_equals_generation_in_process(server, in_process, one_thread):
    """The same texts and token counts from the server, from generate() one conversation at a time,
    and from the explain stage's local backend, which batches them with left padding."""
    from neuronmap.explain.backends import LocalModel
    url, name, _ = server
    model = EndpointModel(url, name, concurrency=2, retries=0, timeout_s=120, request_budget=None)
    completions = model.complete(CONVERSATIONS, MAX_TOKENS)
    assert all(c.text for c in completions) and model.requests == len(CONVERSATIONS)
    expected = reference(*in_process, CONVERSATIONS, MAX_TOKENS)
    assert [c.text for c in completions] == [e[0] for e in expected]
    assert [c.prompt_tokens for c in completions] == [e[1] for e in expected]
    # The server counts the end-of-turn token it stopped on; generate() returns it too.
    assert [c.completion_tokens for c in completions] == [e[2] for e in expected]
    local = LocalModel(*in_process, name, batch_size=len(CONVERSATIONS)).complete(CONVERSATIONS, MAX_TOKENS)
    assert local == completions


@pytest.mark.e2e  # starts `transformers serve` (30-60 s with the model's preparation): make test only
def test_budget_refuses_a_batch_before_sending_it(server):
    url, name, _ = server
    model = EndpointModel(url, name, concurrency=2, retries=0, timeout_s=120, request_budget=3)
    assert len(model.complete(CONVERSATIONS[:2], 2)) == 2
    budget = r"explain\.<explainer\|scorer>\.request_budget.*3 requests allowed, 2 sent"
    with pytest.raises(EndpointError, match=budget):
        model.complete(CONVERSATIONS[:2], 2)
    assert model.requests == 2  # nothing of the refused batch went out
    assert len(model.complete(CONVERSATIONS[:1], 2)) == 1


@pytest.mark.e2e  # starts `transformers serve` (30-60 s with the model's preparation): make test only
def test_unknown_model_fails_at_once_with_the_servers_message(server, caplog):
    url, _, _ = server
    model = EndpointModel(url, "no-such-model", concurrency=1, retries=3, timeout_s=60)
    with caplog.at_level(logging.WARNING, "neuronmap"), pytest.raises(EndpointError, match="HTTP 4"):
        model.complete(CONVERSATIONS[:1], 2)
    assert not [r for r in caplog.records if "try" in r.getMessage()]  # a 4xx is not retried


def test_timeout_names_the_setting():
    """A server that accepts the connection and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        model = EndpointModel(url, "m", concurrency=1, retries=1, timeout_s=0.5, backoff_s=0.01,
                              where="explain.scorer")
        start = time.monotonic()
        timeout = r"no answer within 0.5 s \(explain\.scorer\.timeout_s\).*2 tries"
        with pytest.raises(EndpointError, match=timeout):
            model.complete(CONVERSATIONS[:1], 2)
        assert 1.0 <= time.monotonic() - start < 10


class Flaky(BaseHTTPRequestHandler):
    """Answers each conversation 429, then 503, then its completion (the last user message back)."""
    seen: dict = {}
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = request["messages"][-1]["content"]
        with self.lock:
            tries = self.seen[content] = self.seen.get(content, 0) + 1
        if tries < 3:
            status, body = (429, {"error": {"message": "slow down"}}) if tries == 1 else (503, {"error": "busy"})
        else:
            time.sleep(0.05 * (len(content) % 3))  # finish out of order
            status, body = 200, {"choices": [{"message": {"role": "assistant", "content": content.upper()}}],
                                 "usage": {"prompt_tokens": len(content), "completion_tokens": 1}}
        data = json.dumps(body).encode()
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_429_and_5xx_are_retried_and_order_is_kept(caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d/v1/" % server.server_address[1]  # a base URL with /v1 works as well
        model = EndpointModel(url, "m", concurrency=4, retries=2, timeout_s=10, backoff_s=0.01)
        words = [f"word {i} " + "x" * i for i in range(8)]
        with caplog.at_level(logging.WARNING, "neuronmap"):
            completions = model.complete([[{"role": "user", "content": w}] for w in words], 4)
        assert [c.text for c in completions] == [w.upper() for w in words]
        assert [c.prompt_tokens for c in completions] == [len(w) for w in words]
        assert len([r for r in caplog.records if "HTTP 429" in r.getMessage()]) == len(words)
        assert len([r for r in caplog.records if "HTTP 503" in r.getMessage()]) == len(words)
        Flaky.seen.clear()
        stubborn = EndpointModel(url, "m", concurrency=1, retries=1, timeout_s=10, backoff_s=0.01)
        busy = r"HTTP 503: busy \(after 2 tries; explain\.<explainer\|scorer>\.retries is 1\)"
        with pytest.raises(EndpointError, match=busy):
            stubborn.complete([[{"role": "user", "content": "again"}]], 4)
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("NEURONMAP_TEST_KEY", raising=False)
    with pytest.raises(EndpointError, match="NEURONMAP_TEST_KEY is not set"):
        EndpointModel("http://127.0.0.1:1", "m", 1, 0, 1.0, api_key_env="NEURONMAP_TEST_KEY")
    monkeypatch.setenv("NEURONMAP_TEST_KEY", "sk-test")
    model = EndpointModel("http://127.0.0.1:1", "m", 1, 0, 1.0, api_key_env="NEURONMAP_TEST_KEY")
    assert model.headers["Authorization"] == "Bearer sk-test"


def corpus_contexts(tokenizer, n_tokens: int = 16) -> pl.DataFrame:
    """The test corpus's texts cut into contexts of the model's tokens (the corpus pass's table)."""
    rows = []
    for path in sorted((REPO / "tests" / "data" / "corpus").glob("*.jsonl")):
        for line_number, line in enumerate(path.read_text().splitlines()):
            ids = tokenizer(json.loads(line)["text"])["input_ids"]
            for start in range(0, len(ids) - 4, n_tokens):
                rows.append({"context_id": len(rows), "document": f"{path.name}:{line_number}",
                             "n_tokens": len(ids[start:start + n_tokens]), "token_ids": ids[start:start + n_tokens]})
    return pl.DataFrame(rows, schema={"context_id": pl.Int64, "document": pl.String, "n_tokens": pl.Int32,
                                      "token_ids": pl.List(pl.Int32)})


@pytest.mark.e2e  # 82 s on 2 cores at load 12 (2026-12-07): make test only
def test_explain_job_gives_the_same_tables_through_the_endpoint(server, in_process, one_thread, tmp_path):
    """Acceptance: the explain stage's explanations and scores with the embedded model asked
    through the server equal those with it in process (the scorer named alike). All but the AUC:
    transformers serve ignores `logprobs`, so through it the AUC reads the yes/no answers alone
    (and equals the balanced accuracy), where in process it reads the odds of "yes"."""
    from neuronmap.explain.backends import LocalModel
    from neuronmap.explain.explainers import load_template
    from neuronmap.explain.job import controls, explain_units, score_units
    from neuronmap.explain.journal import Journal
    from neuronmap.explain.scoring import ModelScorer
    from neuronmap.explain.settings import ExplainSettings
    url, name, _ = server
    model, tokenizer = in_process
    contexts = corpus_contexts(tokenizer)
    units = pl.DataFrame({"site": ["act", "up"], "layer": [3, 25], "unit": [7, 1000]},
                         schema={"site": pl.String, "layer": pl.Int32, "unit": pl.Int32})
    settings = ExplainSettings.defaults(batch_size=2, contexts=min(48, contexts.height), max_tokens=16,
                                        score_contexts=2, top_examples=3, quantile_examples=1)
    explain_template, score_template = load_template(None, "explain.txt"), load_template(None, "score.txt")
    tables_of = {}
    for kind, text_model in (("endpoint", EndpointModel(url, name, concurrency=2, retries=0, timeout_s=300)),
                             ("local", LocalModel(model, tokenizer, name, batch_size=2))):
        explanations, sets = explain_units(units, contexts, model, tokenizer, text_model, explain_template, settings,
                                           Journal(tmp_path / f"{kind}-explain.jsonl", {}))
        scores = score_units(units, explanations, sets, controls(units, explanations, seed=0),
                             ModelScorer(text_model, score_template), Journal(tmp_path / f"{kind}-score.jsonl", {}))
        tables_of[kind] = (explanations, sets, scores)
    (explanations, sets, scores), local = tables_of["endpoint"], tables_of["local"]
    assert explanations.filter(pl.col("explainer") == "model")["completion_tokens"].min() > 0
    assert explanations.equals(local[0]), (explanations.to_dicts(), local[0].to_dicts())
    assert sets.equals(local[1]) and scores.drop("auc").equals(local[2].drop("auc"))
    assert scores["auc"].equals(scores["balanced_accuracy"].alias("auc"), null_equal=True)
    assert scores.height == 6 and set(scores["scorer"]) == {name}


def test_stopped_server_fails_clearly_after_retries(caplog):
    """A server that answered, then stopped (a stdlib one here: the module's transformers server
    stays up for the other tests, which pytest-xdist may run after this one)."""
    Flaky.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d" % server.server_address[1]
    model = EndpointModel(url, "m", concurrency=2, retries=2, timeout_s=5, backoff_s=0.01)
    assert model.complete(CONVERSATIONS[:2], 4)[1].text  # after its 429 and 503
    server.shutdown()
    server.server_close()
    refused = r"connection failed.*after 3 tries; explain\.<explainer\|scorer>\.retries is 2"
    with caplog.at_level(logging.WARNING, "neuronmap"), pytest.raises(EndpointError, match=refused):
        model.complete(CONVERSATIONS[2:], 4)
    assert len([r for r in caplog.records if "connection failed" in r.getMessage()]) >= 2
