"""Continuous batching and the Ollama API fixes real clients needed: a real server on a loopback port, the
built-in SmolLM2 GGUF, the official `ollama` and `openai` clients."""

from __future__ import annotations

import datetime
import json
import logging
import threading

import httpx
import ollama
import openai
import pytest

from tests.serve_fixtures import MODEL, add_smol, start_server, wait_until
from tunesmith.serve.store import Store

QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
# Eight prompts whose answers differ, so a mix-up between sequences in one batch would show.
PROMPTS = [
    "What is the capital of France?", "Give me three tips for driving in the rain.",
    "Explain what a roundabout is.", "Write a haiku about traffic lights.",
    "What should I do at a yellow light?", "Describe how to merge onto a highway.",
    "What is the speed of light?", "Name three colors of the rainbow.",
]
COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm2_gguf):
    store = Store(tmp_path_factory.mktemp("store"))
    add_smol(store, smollm2_gguf)
    server = start_server(store, parallel=8)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oc(live) -> ollama.Client:
    return ollama.Client(host=live.url)



def _batcher(server):
    return server.engine.runners[MODEL].batcher


# ---------------------------------------------------------------------- batching


def test_eight_concurrent_streams_give_the_texts_of_one_at_a_time(live, oc):
    options = {**GREEDY, "num_predict": 40}
    alone = [oc.generate(model="smol", prompt=p, options=options).response for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS)
    batcher = _batcher(live)
    batcher.widest = 0
    together: list[str | None] = [None] * len(PROMPTS)
    started = threading.Barrier(len(PROMPTS))

    def ask(i: int) -> None:
        chunks = oc.generate(model="smol", prompt=PROMPTS[i], options=options, stream=True)
        first = next(chunks)
        started.wait(timeout=120)  # every stream is generating before any reads on
        together[i] = first.response + "".join(c.response for c in chunks)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert together == alone
    assert batcher.widest == len(PROMPTS)  # they really were decoded in one batch


def test_a_client_leaving_mid_batch_frees_its_slot(tmp_path, smollm2_gguf):
    store = Store(tmp_path)
    add_smol(store, smollm2_gguf)
    server = start_server(store, parallel=2)
    long = {"model": "smol", "prompt": COUNT, "raw": True, "options": {"num_predict": 2000, "temperature": 0}}
    try:
        with httpx.stream("POST", server.url + "/api/generate", json=long, timeout=120) as staying:
            staying_lines = staying.iter_lines()
            assert not json.loads(next(staying_lines))["done"]
            with httpx.stream("POST", server.url + "/api/generate", json=long, timeout=120) as leaving:
                leaving_lines = leaving.iter_lines()  # kept: dropping it would close the connection here
                assert not json.loads(next(leaving_lines))["done"]
                batcher = _batcher(server)
                assert all(slot.seq is not None for slot in batcher.slots)
            # The second client hung up: its slot empties within a step, while the first goes on.
            assert wait_until(lambda: sum(slot.seq is not None for slot in batcher.slots) == 1)
            assert wait_until(lambda: server.engine.pending == 1)
            # A new request takes the freed slot and finishes while the first stream is still generating.
            r = httpx.post(server.url + "/api/generate", json={
                "model": "smol", "prompt": QUESTION, "stream": False, "options": {"num_predict": 12, **GREEDY}},
                timeout=120)
            assert r.status_code == 200 and "Paris" in r.json()["response"]
            assert not json.loads(next(staying_lines))["done"]
        assert wait_until(lambda: server.engine.pending == 0)
    finally:
        server.stop()


def test_requests_beyond_the_slots_wait_and_all_finish(live):
    """More concurrent requests than serve.parallel: the extra ones wait for a slot; none is lost."""
    results: list[str] = []

    def ask() -> None:
        r = httpx.post(live.url + "/api/generate", json={"model": "smol", "prompt": QUESTION, "stream": False,
                                                         "options": {"num_predict": 12, **GREEDY}}, timeout=300)
        results.append(r.json()["response"] if r.status_code == 200 else f"HTTP {r.status_code}")

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 12 and len(set(results)) == 1 and "Paris" in results[0], results


def test_a_prompt_sharing_a_prefix_with_a_cached_one_reads_only_the_rest(live, oc):
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat. " * 4
    first = oc.generate(model="smol", prompt=story + "What was the cat's name?", raw=True,
                        options={**GREEDY, "num_predict": 4})
    batcher = _batcher(live)
    before = batcher.reused
    oc.generate(model="smol", prompt=story + "Where did they live?", raw=True, options={**GREEDY, "num_predict": 4})
    # The shared story was found in a slot's cache: only the new question was evaluated.
    assert batcher.reused - before >= first.prompt_eval_count - 12


# ---------------------------------------------------------------------- logprobs


def test_ollama_generate_and_chat_return_logprobs(live, oc):
    options = {**GREEDY, "num_predict": 8}
    r = oc.generate(model="smol", prompt=QUESTION, options=options, logprobs=True, top_logprobs=3)
    assert r.logprobs and len(r.logprobs) == r.eval_count
    assert "".join(lp.token for lp in r.logprobs).startswith(r.response)
    for lp in r.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
        # Greedy without penalties picks the most likely token.
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
    streamed = list(oc.generate(model="smol", prompt=QUESTION, options=options, logprobs=True, stream=True))
    tokens = [lp for c in streamed for lp in (c.logprobs or [])]
    assert [t.token for t in tokens] == [lp.token for lp in r.logprobs]
    assert all(not t.top_logprobs for t in tokens)  # top_logprobs 0: the chosen token only
    chat = oc.chat(model="smol", messages=[{"role": "user", "content": QUESTION}], options=options, logprobs=True,
                   top_logprobs=2)
    assert len(chat.logprobs) == chat.eval_count and len(chat.logprobs[0].top_logprobs) == 2
    assert "".join(lp.token for lp in chat.logprobs).startswith(chat.message.content)
    plain = oc.generate(model="smol", prompt=QUESTION, options=options)
    assert plain.logprobs is None  # only when asked for
    wire = httpx.post(live.url + "/api/generate", json={"model": "smol", "prompt": QUESTION, "stream": False,
                                                        "options": options, "logprobs": True}).json()["logprobs"]
    assert [bytes(lp["bytes"]).decode() for lp in wire] == [lp.token for lp in r.logprobs]  # Ollama's `bytes`
    with pytest.raises(ollama.ResponseError, match="top_logprobs must be between 0 and 20") as error:
        oc.generate(model="smol", prompt=QUESTION, options=options, logprobs=True, top_logprobs=21)
    assert error.value.status_code == 400


def test_openai_chat_completions_return_logprobs(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    plain = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    legacy = client.completions.create(model="smol", prompt=QUESTION, max_tokens=8, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens
    assert all(len(alternatives) == 2 for alternatives in legacy.choices[0].logprobs.top_logprobs)


# ---------------------------------------------------------------------- incomplete UTF-8


CHINESE = "请用中文回答：中国的首都是哪里？"


def _valid_prefix(data: bytes) -> str:
    for end in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"{data!r} is not UTF-8 with an incomplete tail")


def test_an_answer_cut_inside_a_character_drops_the_partial_bytes(live, oc, smollm2_gguf):
    """SmolLM2 writes Chinese characters as several byte tokens; num_predict can stop between them."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    full = oc.generate(model="smol", prompt=CHINESE, options={**GREEDY, "num_predict": 16})
    generated = full.context[full.prompt_eval_count:]
    pieces = [vocab.detokenize([t]) for t in generated]
    cuts = []
    for k in range(1, len(pieces) + 1):
        try:
            b"".join(pieces[:k]).decode("utf-8")
        except UnicodeDecodeError:
            cuts.append(k)
    assert cuts, f"no cut inside a character in {pieces}"  # the case this test is about does occur
    for k in sorted({cuts[0], cuts[-1]}):
        expected = _valid_prefix(b"".join(pieces[:k]))
        options = {**GREEDY, "num_predict": k}
        r = oc.generate(model="smol", prompt=CHINESE, options=options)
        assert r.response == expected and "\ufffd" not in r.response
        chunks = list(oc.generate(model="smol", prompt=CHINESE, options=options, stream=True))
        assert "".join(c.response for c in chunks) == expected
        assert all(c.response and "\ufffd" not in c.response for c in chunks[:-1])  # no line of just U+FFFD
        assert chunks[-1].done and not chunks[-1].response
    chat = oc.chat(model="smol", messages=[{"role": "user", "content": CHINESE}],
                   options={**GREEDY, "num_predict": cuts[0]})
    assert "\ufffd" not in chat.message.content


# ---------------------------------------------------------------------- keep_alive and /api/ps


@pytest.mark.parametrize("stream", [False, True])
def test_keep_alive_0_right_after_keep_alive_forever_unloads(oc, stream):
    for _ in range(6):
        r = oc.generate(model="smol", prompt="Hi", keep_alive=-1, options={"num_predict": 2}, stream=stream)
        if stream:
            r = list(r)[-1]
        assert r.done
        assert MODEL in [m.model for m in oc.ps().models]
        assert oc.generate(model="smol", prompt="", keep_alive=0).done_reason == "unload"
        assert MODEL not in [m.model for m in oc.ps().models]


def test_ps_right_after_a_request_shows_its_keep_alive(oc):
    for _ in range(6):
        oc.generate(model="smol", prompt="Hi", keep_alive="10m", options={"num_predict": 2})
        now = datetime.datetime.now(datetime.UTC)
        (model,) = [m for m in oc.ps().models if m.model == MODEL]
        left = (model.expires_at - now).total_seconds()
        assert 590 <= left <= 601, model.expires_at
    oc.generate(model="smol", prompt="", keep_alive=-1)
    (model,) = [m for m in oc.ps().models if m.model == MODEL]
    assert model.expires_at.year > datetime.datetime.now().year + 50  # Ollama's "forever"


def test_unload_while_busy_happens_when_the_request_ends(live, oc):
    long = {"model": "smol", "prompt": COUNT, "raw": True, "keep_alive": -1,
            "options": {"num_predict": 2000, "temperature": 0}}
    with httpx.stream("POST", live.url + "/api/generate", json=long, timeout=120) as running:
        # Keep the line iterator: a dropped one is closed at once, and httpcore closes the connection with it.
        lines = running.iter_lines()
        assert not json.loads(next(lines))["done"]
        assert oc.generate(model="smol", prompt="", keep_alive=0).done_reason == "unload"
        assert MODEL in [m.model for m in oc.ps().models]  # still generating for the first client
        assert not json.loads(next(lines))["done"]
    assert wait_until(lambda: MODEL not in [m.model for m in oc.ps().models])


# ---------------------------------------------------------------------- create with GPU parameters


def test_create_accepts_gpu_parameters_and_logs_that_they_are_ignored(oc, caplog):
    with caplog.at_level(logging.INFO, logger="tunesmith.serve"):
        status = oc.create(model="gpu-params", from_="smol",
                           parameters={"num_gpu": 99, "main_gpu": 0, "use_mmap": False, "temperature": 0})
    assert status.status == "success"
    assert "num_gpu" in caplog.text and "use_mmap" in caplog.text and "ignored" in caplog.text
    assert "num_gpu" in oc.show("gpu-params").parameters  # kept in the model, as Ollama keeps it
    r = oc.generate(model="gpu-params", prompt=QUESTION, options={"num_predict": 12, "num_gpu": 1})
    assert "Paris" in r.response
    with pytest.raises(ollama.ResponseError, match="unknown parameter"):
        oc.create(model="bad-params", from_="smol", parameters={"no_such_parameter": 1})
    oc.delete("gpu-params")


def _burst(gguf, n_batch: int) -> tuple[list[int], int]:
    """Four requests arriving in one instant: their first-token stamps, and how many tokens the first had
    generated when the last gave its first."""
    from tunesmith.llama.batching import Batcher, Piece, Sequence
    from tunesmith.serve.options import Options

    batcher = Batcher(gguf, num_ctx=512, parallel=4, n_threads=1, n_batch=n_batch)
    try:
        opts = Options(**GREEDY, num_predict=12)
        done = [threading.Event() for _ in range(4)]
        seqs: list[Sequence] = []
        first_had: list[int] = []

        def emit(i: int):
            def receive(item) -> None:
                if i == 3 and isinstance(item, Piece) and not first_had:
                    first_had.append(len(seqs[0].generated))
                if not isinstance(item, Piece):
                    done[i].set()
            return receive

        # Raw prompts whose greedy continuations do not end at once.
        prompts = ["1, 2, 3, 4, 5,", "10, 20, 30, 40,", "a, b, c, d, e,", "Monday, Tuesday, Wednesday,"]
        with batcher._cond:  # the decode loop admits under this lock: all four are waiting when it next looks
            for i in range(4):
                seq = Sequence(batcher.tokenize(prompts[i]), opts, batcher.sampler(opts), emit(i), threading.Event(),
                               None, 12, batcher.n_ctx)
                assert len(seq.prompt) > 4
                seqs.append(seq)
                batcher.submit(seq)
        assert all(event.wait(120) for event in done)
        assert batcher.widest == 4
        return [seq.first_at for seq in seqs], first_had[0]
    finally:
        batcher.close()


def test_a_burst_of_prompts_is_read_one_at_a_time_in_arrival_order_before_any_generating_step(smollm2_gguf):
    """Each step reads one prompt, the earliest first, and nothing else: the k-th request answers after k
    prompts' work, and the first has sampled only its first token when the last gives its own."""
    firsts, first_had = _burst(smollm2_gguf, n_batch=512)
    assert firsts == sorted(firsts) and len(set(firsts)) == 4
    assert first_had == 1


def test_generating_sequences_wait_for_at_most_n_batch_prompt_tokens(smollm2_gguf):
    """With n_batch 4, every prompt is read in chunks of 4 with a generating step after each chunk once a
    sequence generates: request 0 keeps generating while the later prompts are read."""
    firsts, first_had = _burst(smollm2_gguf, n_batch=4)
    assert firsts == sorted(firsts) and len(set(firsts)) == 4
    assert first_had >= 6  # prompts 1-3 are at least 5 tokens: two chunks each, a generating step after each
