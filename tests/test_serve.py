"""Stage 12: the server as its command line runs it, a real process on a free port of 127.0.0.1,
talked to by OpenAI's own client and by plain HTTP; the engine on its own against transformers'
generate; the chat page in Chromium."""
import json
import signal
import socket
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ROOT, load_stage, stage_error
from test_chat import moved_copies

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

serve = load_stage("12_serve")
KEY = "a key of the tests"
PROMPTS = ["Good morrow.", "How fares the king?", "Where is the duke?", "What news?",
           "Is supper ready?", "Who knocks?", "Shall we go?", "What hour is it?",
           "Art thou weary?", "Farewell, friend.", "Wilt thou help me?", "Is the queen in?",
           "Speak, man.", "O, my lord!", "Come hither, boy.", "What say you?"]


def start(folder, *flags):
    """python 12_serve.py --init-from folder with flags, on a free port, once it answers /health:
    its address and its process (what it says on stderr goes to folder/server.log)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(folder.parent / f"{folder.name}.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "12_serve.py"), "--init-from",
                                str(folder), "--port", str(port), *flags], cwd=folder.parent,
                               stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server stopped: {open(log.name).read()}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            return url, process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("the server did not answer within a minute")


def stop(process):
    """SIGTERM, as a job scheduler stops a job: the server ends with status 0."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def chat_server(base):
    """The server of the base fixture's chat model (a quick run of stage 08, a context of 64
    characters), asking for an API key."""
    url, process = start(base / "chat", "--api-key", KEY)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=f"{chat_server}/v1", api_key=KEY, max_retries=0)


def ask(client, prompt, **options):
    """The reply to a chat of one message, and the whole response."""
    response = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": prompt}], **options)
    return response.choices[0].message.content, response


def test_openais_client_gets_a_reply_and_the_same_reply_streamed(client):
    assert [model.id for model in client.models.list()] == ["chat"]
    text, response = ask(client, "Good morrow.", temperature=0)
    usage = response.usage
    assert usage.prompt_tokens == 15 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Good morrow."}], temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finishes == [response.choices[0].finish_reason]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # the usage in a last chunk of its own, with no choice
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    # a text to go on, without the chat template
    completion = client.completions.create(model="chat", prompt="ROMEO:", max_tokens=8,
                                           temperature=0)
    assert completion.usage.prompt_tokens == 6 and completion.usage.completion_tokens <= 8
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_a_stop_string_ends_the_reply_before_it(client):
    text, _ = ask(client, "Good morrow.", temperature=0)
    cut = text[2:4]
    shorter, response = ask(client, "Good morrow.", temperature=0, stop=[cut])
    assert shorter == text[:text.index(cut)] and response.choices[0].finish_reason == "stop"


def test_batching_changes_no_reply(client, chat_server, base):
    """16 requests of prompts of different lengths, at once but each a little after the one
    before (they join the batch while others run): each reply the one it gets served alone,
    greedily and with a seed. If one ever differs, the test says where and how near a tie the
    two tokens were. After the burst every block is back in the pool."""
    def reply(i, temperature, wait=0.0):
        time.sleep(wait)
        return ask(client, PROMPTS[i], seed=i, temperature=temperature)[0]

    for temperature in (0, 1.0):
        alone = [reply(i, temperature) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda i, t=temperature: reply(i, t, 0.01 * i), range(16)))
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            if a != b:
                pytest.fail(where_they_part(base / "chat", PROMPTS[i], a, b, temperature, i))
    assert len(set(alone)) > 1  # sampled replies differ from one another
    state = httpx.get(f"{chat_server}/health").json()
    assert state["running"] == 0 and state["kv_blocks_free"] == state["kv_blocks"]


def where_they_part(folder, prompt, alone, together, temperature, seed):
    """Which token of the reply served alone the batched reply did not make, and how near a tie
    it was: the logits of the two likeliest tokens there, served alone in the server's precision,
    in the engine."""
    model, template = load_stage("09_lora").load_model(str(folder))
    engine = engine_of(model, template, dtype=serve.resolve_dtype("auto", torch.device("cpu")))
    logits = []
    advance = engine.advance

    def kept(requests, rows):
        logits.append(rows[0].float())
        advance(requests, rows)

    engine.advance = kept
    ids = template.render([{"role": "user", "content": prompt}], reply_next=True)[0]
    request = serve.Request(ids, engine.context - len(ids), temperature, None, None, seed, [],
                            lambda event: None)
    engine.submit(request)
    with serve.autocast(engine.args, engine.device):
        while engine.waiting or engine.running:
            engine.step()
    # where the two texts part: their first character that differs, or where the shorter ends
    parted = next(i for i, (a, b) in enumerate(zip(alone + "\0", together + "\0", strict=False))
                  if a != b)
    reply = request.reply()
    token = next(t for t in range(len(reply)) if len(template.decode(reply[:t + 1])) > parted)
    (first, second), (a, b) = logits[token].topk(2)
    return (f"{prompt!r} at temperature {temperature}: served alone {alone!r}, batched "
            f"{together!r}; they part at reply token {token}, where alone the likeliest tokens "
            f"were {template.decode([int(a)])!r} (logit {first:.4f}) and "
            f"{template.decode([int(b)])!r} ({second:.4f}), {first - second:.4f} apart")


def post(url, body, headers=None, raw=None):
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    return httpx.post(f"{url}/v1/chat/completions", content=raw, json=None if raw else body,
                      headers=headers, timeout=30)


GOOD = {"model": "chat", "messages": [{"role": "user", "content": "Good morrow."}]}


@pytest.mark.parametrize("body, raw, headers, status, says", [
    (None, b"{not json", None, 400, "the body is not JSON"),
    ({"model": "chat"}, None, None, 400, "messages must be a non-empty list"),
    ({"messages": GOOD["messages"]}, None, None, 400, "model is missing"),
    ({**GOOD, "model": "gpt-5"}, None, None, 404, "the model 'gpt-5' does not exist"),
    ({**GOOD, "max_tokens": 60}, None, None, 400,
     "the prompt's 15 tokens and max_tokens 60 come to 75, over the model's context of 64"),
    ({**GOOD, "messages": [{"role": "user", "content": "½ a crown"}]}, None, None, 400,
     "the character '½' never occurs in the training text"),
    ({**GOOD, "messages": GOOD["messages"] * 300}, None, None, 400,
     "the conversation's 300 messages are over the limit of 256"),
    (None, b" " * (2 << 20), None, 413, "over the limit of 1,048,576"),
    ({**GOOD, "temperature": 3}, None, None, 400, "temperature must be between 0 and 2"),
    ({**GOOD, "n": 2}, None, None, 400, "n must be 1"),
    (GOOD, None, {"Authorization": "Bearer wrong"}, 401, "an API key is missing or wrong"),
], ids=["not JSON", "no messages", "no model", "unknown model", "beyond the context",
        "no token for a character", "too many messages", "too large a body", "bad temperature",
        "several replies", "wrong key"])
def test_a_bad_request_gets_openais_error_object_and_the_server_goes_on(chat_server, body, raw,
                                                                       headers, status, says):
    response = post(chat_server, body, headers, raw)
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert post(chat_server, GOOD).status_code == 200


def test_no_key_is_a_401_and_the_page_and_health_need_none(chat_server):
    assert httpx.get(f"{chat_server}/v1/models").status_code == 401
    assert httpx.get(f"{chat_server}/health").json()["status"] == "ok"
    assert "<title>Chat</title>" in httpx.get(chat_server).text


# ------------------------------------------------------------------ long replies, few at a time

def long_model(root):
    """A small random Qwen3 of transformers' with a context of 1,024 tokens and a ChatML
    tokenizer: greedily, it never ends a reply, so each takes all the room it is given."""
    from test_chat import chat_tokenizer
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=1024)
    folder = root / "long"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    chat_tokenizer((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000]).save_pretrained(
        folder)
    return folder


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A server of long replies (greedy ones, of a model that never ends them), one running and
    one waiting at most."""
    url, process = start(long_model(tmp_path_factory.mktemp("long")), "--max-running", "1",
                         "--max-waiting", "1", "--max-new-tokens", "1000", "--temperature", "0",
                         "--dtype", "float32")
    yield url, process
    if process.poll() is None:
        stop(process)


def health(url):
    return httpx.get(f"{url}/health").json()


def stream_of(url, **options):
    """A streamed chat request whose response is read as it comes (a context manager)."""
    body = {"model": "long", "messages": [{"role": "user", "content": "Speak."}], "stream": True,
            **options}
    return httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60)


def test_a_client_that_goes_away_frees_its_blocks(long_server):
    url, _ = long_server
    free = health(url)["kv_blocks_free"]
    with stream_of(url, max_tokens=1000) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        while health(url)["kv_blocks_free"] == free:
            next(lines)
    deadline = time.time() + 10
    while health(url)["kv_blocks_free"] < free and time.time() < deadline:
        time.sleep(0.01)
    after = health(url)
    assert after["kv_blocks_free"] == free and after["running"] == 0


def test_a_full_queue_is_a_429_with_retry_after_and_then_served(long_server):
    url, _ = long_server
    with stream_of(url, max_tokens=900) as first, stream_of(url, max_tokens=900) as second:
        # both read from (an iterator let go of closes its response: a client gone away)
        lines = first.iter_lines(), second.iter_lines()
        assert [next(line)[:6] for line in lines] == ["data: "] * 2
        assert health(url)["running"] + health(url)["waiting"] == 2
        response = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "long", "messages": [{"role": "user", "content": "Speak."}]})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert "requests waiting already" in response.json()["error"]["message"]
    reply = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "long", "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 5},
        timeout=60)
    assert reply.status_code == 200


def test_the_chat_page_streams_a_reply_and_stop_cancels_it(long_server):
    from test_site import browser
    url, _ = long_server
    driver = browser()
    try:
        driver.set_window_size(400, 800)
        driver.get(url)
        driver.find_element("id", "text").send_keys("Speak.")
        driver.find_element("id", "send").click()
        reply = driver.find_element("css selector", ".message.assistant")
        deadline = time.time() + 20
        while len(reply.text) < 20 and time.time() < deadline:
            time.sleep(0.05)
        assert len(reply.text) >= 20, "the reply did not stream in"
        driver.find_element("id", "stop").click()
        while "[stopped]" not in reply.text and time.time() < deadline:
            time.sleep(0.05)
        assert reply.text.endswith("[stopped]")
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.quit()
    # every block back in the pool
    while health(url)["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(url)["kv_blocks_free"] == health(url)["kv_blocks"]


def test_sigterm_finishes_the_replies_under_way_and_exits_0(long_server):
    url, process = long_server
    with stream_of(url, max_tokens=300) as response:
        lines = response.iter_lines()
        next(lines)
        process.send_signal(signal.SIGTERM)
        chunks = [json.loads(line[6:]) for line in lines
                  if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert process.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        health(url)


# ------------------------------------------------------------------------------- the engine

def engine_of(model, template, **settings):
    args = types.SimpleNamespace(**{**serve.SETTINGS, "seed": 0, "dtype": "float32",
                                    **settings})
    return serve.Engine(model.eval(), template, args, torch.device("cpu"))


def replies(engine, prompts, max_tokens):
    """The engine's greedy replies to prompts (token ids), all submitted at once and stepped
    through to the end, as the server's thread steps it."""
    requests = [serve.Request(ids, max_tokens, 0.0, None, None, 0, [], lambda event: None)
                for ids in prompts]
    for request in requests:
        assert engine.submit(request)
    while engine.waiting or engine.running:
        engine.step()
    return [request.reply() for request in requests]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_engine_replies_as_transformers_generate_does(kind, tmp_path, shakespeare):
    folder, = moved_copies(kind, tmp_path, shakespeare[:20_000], names=("model",))
    model, template = load_stage("09_lora").load_model(str(folder))
    prompts = [template.render([{"role": "user", "content": text}], reply_next=True)[0]
               for text in PROMPTS[:4]]
    ours = replies(engine_of(model, template), prompts, 24)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    for prompt, reply in zip(prompts, ours, strict=True):
        with torch.no_grad():
            generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=24,
                                        do_sample=False, eos_token_id=template.end)
        their_reply = generated[0, len(prompt):].tolist()
        if template.end in their_reply:
            their_reply = their_reply[:their_reply.index(template.end)]
        assert their_reply == reply


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_blocks(base):
    model, template = load_stage("09_lora").load_model(str(base / "chat"))
    engine = engine_of(model, template)
    free = len(engine.pool.free)
    ids = template.render([{"role": "user", "content": "Good morrow."}], reply_next=True)[0]
    request = serve.Request(ids, 40, 1.0, None, None, 0, [], lambda event: None)
    engine.submit(request)
    engine.step()
    assert request in engine.running and len(engine.pool.free) < free
    engine.cancel(request)
    engine.step()
    assert engine.running == [] and len(engine.pool.free) == free
    assert request.finished == "cancelled"


def test_a_pool_too_small_for_every_request_preempts_and_still_answers_each(base):
    """Blocks for two full contexts and eight requests that want more: the newest running ones
    give their blocks back and are read again later; every request is answered, all its
    max_tokens, and every block is back in the pool at the end."""
    model, template = load_stage("09_lora").load_model(str(base / "chat"))
    prompts = [template.render([{"role": "user", "content": text}], reply_next=True)[0]
               for text in PROMPTS[:8]]
    engine = engine_of(model, template, kv_blocks=8, block_tokens=16)
    requests = [serve.Request(ids, 64 - len(ids), 1.0, None, None, i, [], lambda event: None)
                for i, ids in enumerate(prompts)]
    for request in requests:
        engine.submit(request)
    while engine.waiting or engine.running:
        engine.step()
    assert all(r.finished in ("stop", "length") for r in requests)
    assert len(engine.pool.free) == 8


def test_a_taken_port_and_a_model_with_no_chat_template_are_refused_in_one_sentence(base,
                                                                                     capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        err = stage_error(capsys, serve.main, "--init-from", str(base / "chat"), "--port", port)
        assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in err
    # stage 07's run: a model with no chat template yet
    err = stage_error(capsys, serve.main, "--init-from", str(base), "--port", port)
    assert "no chat template" in err and "07_modern.py" in err
    assert "--port: must be from 1 to 65535" in stage_error(capsys, serve.main, "--port", "70000")
