# %% [markdown]
"""12_serve.py: serve many users at once: continuous batching, a paged KV cache, OpenAI's API.

New here, in what comes after training: one model, many users at once. An engine works a step at
a time, and requests join at any step and leave at the step they finish, so that a second user
never waits for the first to be done (continuous batching, Yu et al. 2022). A step is two
forward passes: one reads the prompts of the requests that joined, 64 of their tokens (a longer
prompt goes on at the next step), and one gives every request its next token. Their keys and
values live in a paged KV cache: fixed blocks of positions from one pool allocated when the
server starts, a table of blocks for each request, a block taken as its text grows and given
back the step it ends or its client goes away, so that memory follows the tokens held, not
requests x context (vLLM's PagedAttention, Kwon et al. 2023). When the pool runs out, the newest
request is preempted, its blocks given back, and it is read again from its text once there is
room. Batching changes nothing: every pass of a kind has the same number of rows, padded (on a
CPU a row of a product is the same bit for bit whatever the other rows hold, not whatever their
number), and every row attends over its own request's keys, chunk by chunk, the same way
whatever the other rows hold, so that a reply is, token for token, the one the request gets
served alone. Sampling is the request's own (temperature, top-p, top-k, a seed, stop strings,
max_tokens). In front of it, OpenAI's API (FastAPI and uvicorn): /v1/chat/completions and
/v1/completions, streamed as server-sent events or whole, /v1/models, /health, errors as OpenAI's
error objects; and a chat page at /.

This stage builds on stage 09 and imports it: the model, loading a chat model (adapters folded in
on load), the chat template and the samplers are 09's; what this file holds is serving. It serves
the model stage 10 writes by default (runs/10_dpo, made first if it is not there), or
--init-from a run of stage 08 to 11 or a Llama or Qwen3 chat model.

Run with no flags for the server measured below (2-core CPU, 1.4 s to start); --help lists the
flags. Expect: "serving 10_dpo at http://127.0.0.1:8000/", a chat page there, and OpenAI's API
under /v1, for curl or OpenAI's own client (docs/12_serve.md shows both). Sixteen clients at once
get 651 tokens a second, 6.0x what the same server gives them one request at a time
(--max-running 1).
"""
# %%
import asyncio
import importlib
import json
import math
import random
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import fastapi
import torch
import uvicorn
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from shared import ROOT, UserError
from shared.cli import checked, nonempty, parse_args, run
from shared.conversations import HuggingFaceChat
from shared.device import select_device

# Stage 09, which this stage builds on: a file name that starts with a digit can't follow
# `import`, so importlib loads it. What this stage takes from it, by name:
stage09 = importlib.import_module("09_lora")
# a chat model to serve, its adapters folded in
make_base = stage09.make_base
load_model = stage09.load_model
stage_folder = stage09.stage_folder
trained_at = stage09.trained_at
merge = stage09.merge
# the model's parts, run a step at a time, and in what precision
rope_table = stage09.rope_table
resolve_dtype = stage09.resolve_dtype
autocast = stage09.autocast
# a token drawn from the logits
sample_next = stage09.sample_next

# the stage's name (in a notebook there is no file name to read)
STAGE = "12_serve"
# without --init-from, the server serves the default run of stage 10, made first if missing
BASE_SCRIPT = "10_dpo.py"
BASE = "runs/10_dpo"
# decoding reads the KV cache this many blocks at a time
CHUNK_BLOCKS = 4
# the most a request's body may hold, and the most messages a conversation may have
MAX_BODY = 1 << 20
MAX_MESSAGES = 256


# %% Hyperparameters: the flags' defaults (block_tokens is --block-tokens); edit them in a notebook
# In a notebook this list is the command line: any flag, e.g. ["--port", "8001"]
notebook_flags = []
SETTINGS = dict(max_running=16, max_waiting=64, prefill_tokens=64, block_tokens=16, kv_blocks=0,
                grace=10.0)


# %% The paged KV cache

class BlockPool:
    """Every key and value the engine holds: for each layer a pool of blocks, each block the keys
    (and values) of block_tokens positions of one request, allocated all at once. A request
    holds a table of blocks, its positions in order: position p is in block table[p //
    block_tokens], at p % block_tokens. Blocks are taken as a request grows and given back when
    it ends, so what is in use follows the tokens held."""

    def __init__(self, model, blocks, block_tokens, device):
        config = model.config
        shape = (len(model.h), blocks, config.n_kv_head or config.n_head, block_tokens,
                 model.head_dim)
        self.keys = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        self.block_tokens = block_tokens
        self.free = list(range(blocks))

    def blocks_for(self, positions):
        return math.ceil(positions / self.block_tokens)

    def grow(self, table, positions):
        """Blocks enough for positions, taken into table; False, and none taken, if the pool has
        too few left."""
        wanted = self.blocks_for(positions) - len(table)
        if wanted > len(self.free):
            return False
        table += [self.free.pop() for _ in range(max(wanted, 0))]
        return True

    def release(self, table):
        self.free += reversed(table)
        table.clear()

    def where(self, rows, positions):
        """The blocks and the offsets in them of the positions (rows,) of rows' requests (None: a
        row of padding, left out): where their keys and values go."""
        blocks, offsets = [], []
        for request, position in zip(rows, positions.tolist(), strict=True):
            if request is not None:
                blocks.append(request.table[position // self.block_tokens])
                offsets.append(position % self.block_tokens)
        device = self.keys.device
        return torch.tensor(blocks, device=device), torch.tensor(offsets, device=device)

    def write(self, layer, where, k, v):
        """k and v (positions, kv_heads, head_dim) into the pool, at where."""
        blocks, offsets = where
        self.keys[layer, blocks, :, offsets] = k.float()
        self.values[layer, blocks, :, offsets] = v.float()

    def tables(self, rows, lengths):
        """The tables of rows' requests as one tensor (rows, blocks): for each row the blocks of
        its first lengths[i] positions, as many as the longest needs, rounded up to whole chunks
        of CHUNK_BLOCKS; the rest, and a padding row's, block 0 (read, then masked out)."""
        width = CHUNK_BLOCKS * math.ceil(self.blocks_for(max(lengths)) / CHUNK_BLOCKS)
        tables = []
        for request, length in zip(rows, lengths, strict=True):
            table = request.table[:self.blocks_for(length)] if request else []
            tables.append(table + [0] * (width - len(table)))
        return torch.tensor(tables, device=self.keys.device)


# %% A forward pass over the pool

def attend(pool, layer, q, tables, lengths):
    """A decoding step's attention: each row's query (rows, n_head, 1, head_dim) over the keys and
    values of the first lengths[i] positions of its blocks, tables[i]. Every row reads the same
    chunk of CHUNK_BLOCKS blocks at a time, a softmax carried from chunk to chunk (as flash
    attention does): a position past a row's length weighs exactly 0, a chunk past it leaves
    every number of the row as it was, and the products have the same shape whatever the other
    rows hold, so that a row's result is, to the last bit, the one it gets alone."""
    rows, heads, _, head_dim = q.shape
    kv_heads = pool.keys.size(2)
    q = q.view(rows, kv_heads, heads // kv_heads, head_dim) * head_dim ** -0.5
    chunk = CHUNK_BLOCKS * pool.block_tokens
    past = torch.arange(tables.size(1) * pool.block_tokens, device=q.device) >= lengths[:, None]
    best = q.new_full((rows, kv_heads, heads // kv_heads, 1), -math.inf)
    total = torch.zeros_like(best)
    out = torch.zeros_like(q)
    for first in range(0, tables.size(1), CHUNK_BLOCKS):
        blocks = tables[:, first:first + CHUNK_BLOCKS]
        # (rows, kv_heads, chunk, head_dim)
        k, v = (cache[layer, blocks].transpose(1, 2).flatten(2, 3)
                for cache in (pool.keys, pool.values))
        start = first * pool.block_tokens
        scores = (q @ k.transpose(2, 3)).masked_fill(past[:, None, None, start:start + chunk],
                                                     -math.inf)
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        weights = (scores - new_best).exp()
        carried = (best - new_best).exp()
        total = total * carried + weights.sum(-1, keepdim=True)
        out = out * carried + weights @ v
        best = new_best
    return (out / total).view(rows, heads, 1, head_dim)


@torch.no_grad()
def forward(model, pool, rows, tokens, positions, logits=True):
    """09's model on one token a row, tokens and positions (rows,), rows[i] the request the token
    is of, or None for a row of padding. Each token's key and value go into its request's blocks,
    and its query attends over the keys its request holds up to its own position, this pass's
    included (a prompt's tokens fill many rows of a pass). The logits of each row, (rows,
    vocab_size), if asked for."""
    x = model.wte(tokens)[:, None]
    # RoPE at each row's own position
    cos, sin = rope_table(positions, model.head_dim, model.config.rope_theta)
    rope = (cos[:, None, None], sin[:, None, None])
    real = [i for i, request in enumerate(rows) if request is not None]
    where = pool.where(rows, positions)
    # a padding row reads one position, to have a softmax with no NaN
    lengths = positions + 1
    lengths[[i for i, request in enumerate(rows) if request is None]] = 1
    tables = pool.tables(rows, lengths.tolist())
    for layer, block in enumerate(model.h):
        attention = block.attn
        q, k, v = attention.heads(block.ln_1(x), rope)
        pool.write(layer, where, k[real, :, 0], v[real, :, 0])
        y = attend(pool, layer, q, tables, lengths)
        x = x + attention.o_proj(y.transpose(1, 2).flatten(2).to(x.dtype))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x[:, 0])) if logits else None


# %% The engine: continuous batching

class Request:
    """One completion in the engine: its token ids so far (the prompt's, then the reply's), the
    blocks that hold their keys and values, how it samples and when it stops, and emit, which
    hands what it makes to the server: ("text", a piece) and at the end ("done", the finish
    reason, the counts of tokens)."""

    def __init__(self, ids, max_tokens, temperature, top_p, top_k, seed, stop, emit):
        self.ids = list(ids)
        self.prompt_tokens = len(ids)
        self.max_tokens = max_tokens
        self.sampler = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        # its own random state: the same seed draws the same reply, whatever else is served
        self.random = torch.Generator().manual_seed(seed).get_state()
        self.stop = stop
        self.emit = emit
        self.table = []
        # how many of ids have their keys and values in the table
        self.read = 0
        self.sent = ""
        self.cancelled = False
        self.finished = None

    def reply(self):
        return self.ids[self.prompt_tokens:]

    def take(self, token, template, context):
        """The reply's next token: emit the text it adds that can be sent now (not what could
        still become a stop string, nor the start of a character that ends in a later token), and
        return the finish reason if the reply is done: stop (its end of turn, or a stop string),
        length (max_tokens, or the context is full)."""
        finish = None
        if token == template.end:
            finish = "stop"
        else:
            self.ids.append(token)
        text = template.decode(self.reply())
        cuts = [text.find(stop) for stop in self.stop if stop in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        elif not finish and (len(self.reply()) == self.max_tokens or len(self.ids) == context):
            finish = "length"
        if not finish:
            hold = max((len(stop) - 1 for stop in self.stop), default=0)
            text = text[:len(text) - hold]
            text = text.rstrip("\ufffd")
        if len(text) > len(self.sent):
            self.emit(("text", text[len(self.sent):]))
            self.sent = text
        return finish


class Engine:
    """Continuous batching over a BlockPool: a thread that takes a step while it has requests.
    Each step drops the requests whose client went away, admits waiting ones while fewer than
    --max-running run and the pool has blocks for their text, reads the text of those not read
    yet (read_prompts), then gives every request whose text is read its next token, in one pass
    of --max-running rows. A request that finishes leaves at once, its blocks free for the next
    step's."""

    def __init__(self, model, template, args, device):
        self.model = model
        self.template = template
        self.args = args
        self.device = device
        self.context = model.block_size
        blocks = args.kv_blocks or args.max_running * math.ceil(self.context / args.block_tokens)
        self.pool = BlockPool(model, blocks, args.block_tokens, device)
        self.blocks = blocks
        self.waiting, self.running = [], []
        # the seeds of the requests that give none, drawn from --seed
        self.seeds = random.Random(args.seed)
        self.steps = 0
        self.wake = threading.Condition()
        self.stopping = False

    def submit(self, request):
        """Queue a request (from the server's thread); False if it would be one more than
        --max-running and --max-waiting together."""
        with self.wake:
            held = len(self.running) + len(self.waiting)
            if held >= self.args.max_running + self.args.max_waiting:
                return False
            self.waiting.append(request)
            self.wake.notify()
        return True

    def cancel(self, request):
        """The request's client went away: it leaves at the next step."""
        with self.wake:
            request.cancelled = True
            self.wake.notify()

    def state(self):
        with self.wake:
            held = sum(len(r.ids) for r in self.running)
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "steps": self.steps, "kv_blocks": self.blocks,
                    "kv_blocks_free": len(self.pool.free), "tokens_held": held}

    def loop(self):
        while True:
            with self.wake:
                while not (self.waiting or self.running or self.stopping):
                    self.wake.wait()
                if self.stopping:
                    return
            with autocast(self.args, self.device):
                self.step()

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def step(self):
        with self.wake:
            self.steps += 1
            for request in [r for r in self.waiting + self.running if r.cancelled]:
                self.leave(request, None)
            while self.waiting and len(self.running) < self.args.max_running:
                # room for its text and its next token, or it waits (first come, first served)
                if not self.pool.grow(self.waiting[0].table, len(self.waiting[0].ids) + 1):
                    break
                self.running.append(self.waiting.pop(0))
            running = list(self.running)
        self.read_prompts(running)
        # every request whose text is read, but its last token: that token, and the next drawn,
        # in one pass of --max-running rows
        decoding = [r for r in running
                    if r in self.running and r.read == len(r.ids) - 1 and self.room(r)]
        if decoding:
            padding = self.args.max_running - len(decoding)
            tokens = torch.tensor([r.ids[-1] for r in decoding] + [0] * padding,
                                  device=self.device)
            positions = torch.tensor([len(r.ids) - 1 for r in decoding] + [0] * padding,
                                     device=self.device)
            logits = forward(self.model, self.pool, decoding + [None] * padding, tokens,
                             positions)
            for request in decoding:
                request.read = len(request.ids)
            self.advance(decoding, logits[:len(decoding)])

    def read_prompts(self, running):
        """One pass of --prefill-tokens rows over the texts of the running requests not read
        yet, in the order they came, but for each its last token (the decoding pass reads that
        one); what does not fit waits for the next step, so that a long prompt holds no one up
        for long."""
        size = self.args.prefill_tokens
        rows, positions = [], []
        for request in running:
            unread = list(range(request.read, len(request.ids) - 1))[:size - len(rows)]
            rows += [request] * len(unread)
            positions += unread
            request.read += len(unread)
        if rows:
            padding = size - len(rows)
            tokens = [request.ids[p] for request, p in zip(rows, positions, strict=True)]
            forward(self.model, self.pool, rows + [None] * padding,
                    torch.tensor(tokens + [0] * padding, device=self.device),
                    torch.tensor(positions + [0] * padding, device=self.device), logits=False)

    def room(self, request):
        """A block for the request's next position, preempting the newest running requests for it
        if the pool has none: they give their blocks back and wait at the head of the queue, to
        be read again from their text. False if the request itself was preempted."""
        while not self.pool.grow(request.table, len(request.ids)):
            with self.wake:
                newest = self.running.pop()
                self.pool.release(newest.table)
                newest.read = 0
                self.waiting.insert(0, newest)
            if newest is request:
                return False
        return True

    def advance(self, requests, logits):
        """Each request's next token, drawn from its logits row with its own random state."""
        for request, row in zip(requests, logits.float(), strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(request.random)
                token = sample_next(row[None], **request.sampler).item()
                request.random = torch.get_rng_state()
            finish = request.take(token, self.template, self.context)
            if finish:
                self.leave(request, finish)

    def leave(self, request, finish):
        """The request out of the engine, its blocks back in the pool; and, unless its client
        went away, the end of its reply."""
        with self.wake:
            for queue in (self.waiting, self.running):
                if request in queue:
                    queue.remove(request)
            self.pool.release(request.table)
        request.finished = finish or "cancelled"
        if finish:
            request.emit(("done", finish, request.prompt_tokens, len(request.reply())))


# %% The server: OpenAI's API

class APIError(Exception):
    """A request refused, as OpenAI's API refuses one: its HTTP status and the error object
    {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        kind = {401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(status, "invalid_request_error")
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers


async def read_body(request):
    """The request's JSON object, or an APIError: 413 for a body over MAX_BODY, 400 for one that is
    not a JSON object."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY:
        raise APIError(413, f"the body's {int(length):,} bytes are over the limit of "
                       f"{MAX_BODY:,}")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"the body's {len(raw):,} bytes are over the limit of {MAX_BODY:,}")
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise APIError(400, f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body is not a JSON object")
    return body


def number(body, name, kind, low, high, default):
    """body[name], of kind and within [low, high] (None: no bound), or default if absent or null;
    an APIError naming it if not."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float) if kind is float else int) or isinstance(value, bool):
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}, "
                       f"not {json.dumps(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name} must be between {low} and {high}, not {value}", param=name)
    return kind(value)


def messages_of(body):
    """The conversation of a chat request, each message its role and text; an APIError if it is
    not one. A message's content may be text, or a list of parts of which the text ones count."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"}",
                       param="messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"the conversation's {len(messages)} messages are over the limit of "
                       f"{MAX_MESSAGES}", param="messages")
    found = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] is not a message of the system, the user or the "
                           "assistant with a text content", param=f"messages[{i}]")
        found.append({"role": role, "content": content})
    return found


def completion_request(body, ids, engine, emit):
    """A Request for the engine from the body's sampling and stopping (OpenAI's fields, and top_k),
    checked against the context: an APIError naming what is wrong."""
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1: this server makes one reply a request", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s
                                                              for s in stop)):
        raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    room = engine.context - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt's {len(ids)} tokens fill the model's context of "
                       f"{engine.context} tokens", param="messages")
    default = min(engine.args.max_new_tokens, room)
    max_tokens = number(body, "max_completion_tokens", int, 1, None,
                        number(body, "max_tokens", int, 1, None, default))
    if len(ids) + max_tokens > engine.context:
        raise APIError(400, f"the prompt's {len(ids)} tokens and max_tokens {max_tokens} come "
                       f"to {len(ids) + max_tokens}, over the model's context of "
                       f"{engine.context} tokens", param="max_tokens")
    temperature = number(body, "temperature", float, 0, 2, engine.args.temperature)
    top_p = number(body, "top_p", float, 0, 1, None)
    if top_p == 0:
        raise APIError(400, "top_p must be above 0", param="top_p")
    top_k = number(body, "top_k", int, 1, None, None)
    seed = number(body, "seed", int, 0, 2**63 - 1, None)
    if seed is None:
        seed = engine.seeds.randrange(2**63)
    return Request(ids, max_tokens, temperature, top_p, top_k, seed, stop, emit)


def chunk_of(kind, ident, created, name, choice, **usage):
    """One server-sent event of a stream: a chat.completion.chunk or a text_completion, with
    usage's field if given (OpenAI's "usage": null on every chunk when the usage is asked for)."""
    kinds = {"chat": "chat.completion.chunk", "text": "text_completion"}
    chunk = {"id": ident, "object": kinds[kind], "created": created, "model": name,
             "choices": [choice] if choice else [], **usage}
    return f"data: {json.dumps(chunk)}\n\n"


def make_app(engine, template, name, args):
    """The server: OpenAI's endpoints over the engine, and the chat page at /."""
    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    page = (ROOT / f"{STAGE}.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def refused(request, error):
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.middleware("http")
    async def authorize(request, call_next):
        # the API asks for the key; the page and the health check do not
        given = request.headers.get("authorization", "")
        if (args.api_key and request.url.path.startswith("/v1/")
                and given != f"Bearer {args.api_key}"):
            error = APIError(401, "an API key is missing or wrong: give it as Authorization: "
                             "Bearer KEY", code="invalid_api_key")
            return JSONResponse(error.body, status_code=401)
        return await call_next(request)

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **engine.state()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "llm-from-scratch"}]}

    def encode(read):
        """Token ids from read(), a text the model has no token for refused as a 400."""
        try:
            return read()
        except UserError as err:
            raise APIError(400, str(err)) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await read_body(request)
        check_model(body)
        messages = messages_of(body)
        ids = encode(lambda: template.render(messages, reply_next=True)[0])
        return await answer(request, body, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await read_body(request)
        check_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", param="prompt")
        tokenizer = template.base if isinstance(template, HuggingFaceChat) else template.tokenizer
        return await answer(request, body, encode(lambda: tokenizer.encode(prompt)), "text")

    def check_model(body):
        if "model" not in body:
            raise APIError(400, "model is missing: the model this server serves is "
                           f"{name!r}", param="model")
        if body["model"] != name:
            raise APIError(404, f"the model {body['model']!r} does not exist: this server "
                           f"serves {name!r}", param="model", code="model_not_found")

    async def answer(request, body, ids, kind):
        """The engine's reply to the request, streamed as server-sent events or whole."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        reply = completion_request(body, ids, engine,
                                   lambda event: loop.call_soon_threadsafe(events.put_nowait,
                                                                           event))
        if not engine.submit(reply):
            raise APIError(429, f"the server holds {args.max_waiting} requests waiting already: "
                           "try again in a second", headers={"Retry-After": "1"})
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = {"usage": None} if options.get("include_usage") else {}
            return StreamingResponse(stream(reply, events, kind, ident, created, usage),
                                     media_type="text/event-stream")
        text = ""
        try:
            while (event := await next_event(request, events))[0] == "text":
                text += event[1]
        finally:
            if not reply.finished:
                engine.cancel(reply)
        if event[0] == "gone":
            # no one to answer
            return Response(status_code=499)
        _, finish, prompt_tokens, reply_tokens = event
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}}
                  if kind == "chat" else {"index": 0, "text": text})
        return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created, "model": name,
                "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
                "usage": usage_of(prompt_tokens, reply_tokens)}

    async def next_event(request, events):
        """The reply's next event, or ("gone",) once its client went away (looked at twice a
        second)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return ("gone",)

    async def stream(reply, events, kind, ident, created, usage):
        """The reply as OpenAI streams one: a first chunk (the role), a chunk a piece of text, a
        last chunk with the finish reason, the usage if asked for, and [DONE]. A client that goes
        away cancels it (Starlette cancels this generator)."""
        try:
            if kind == "chat":
                first = {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}
                yield chunk_of(kind, ident, created, name, first, **usage)
            event = await events.get()
            while event[0] == "text":
                piece = ({"delta": {"content": event[1]}} if kind == "chat"
                         else {"text": event[1]})
                choice = {"index": 0, **piece, "logprobs": None, "finish_reason": None}
                yield chunk_of(kind, ident, created, name, choice, **usage)
                event = await events.get()
            _, finish, prompt_tokens, reply_tokens = event
            last = {"delta": {}} if kind == "chat" else {"text": ""}
            choice = {"index": 0, **last, "logprobs": None, "finish_reason": finish}
            yield chunk_of(kind, ident, created, name, choice, **usage)
            if usage:
                yield chunk_of(kind, ident, created, name, None,
                               usage=usage_of(prompt_tokens, reply_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not reply.finished:
                engine.cancel(reply)

    return app


def usage_of(prompt_tokens, reply_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": reply_tokens,
            "total_tokens": prompt_tokens + reply_tokens}


# %% [markdown]
# ## Run it
# From a terminal, run this file with python; its flags change the hyperparameters (`--help`
# lists them). In a notebook, edit the hyperparameters cell above, its values or
# notebook_flags, and run all the cells again.

# %% Serve
def add_flags(parser):
    parser.add_argument("--init-from", type=nonempty("a model"), metavar="NAME|DIR",
                        help="serve the --out folder of a run of stage 08 to 11 (adapters folded "
                        "in), or a Llama or Qwen3 chat model: a Hugging Face hub name or a "
                        f"save_pretrained folder (default: {BASE}, made first if missing)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on; 0.0.0.0 for every network the machine "
                        "is on")
    parser.add_argument("--port", type=checked("port", int), default=8000, metavar="INT")
    parser.add_argument("--api-key", type=nonempty("a key"),
                        help="ask every request of the API for this key (Authorization: Bearer "
                        "KEY)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="autocast precision; auto: bfloat16 where the "
                        "hardware has it")
    parser.add_argument("--max-new-tokens", type=checked("max_new_tokens", int), default=256,
                        metavar="INT", help="a reply's max_tokens when its request gives none "
                        "(the context's room at most)")
    parser.add_argument("--temperature", type=checked("temperature", float), default=1.0,
                        metavar="FLOAT", help="a reply's temperature when its request gives "
                        "none; 0: greedy")


HELPS = {"max_running": "requests decoded together, each step",
         "max_waiting": "requests queued beyond those; one more is refused with 429",
         "prefill_tokens": "prompt tokens read in a pass, a pass a step (a longer prompt goes on "
                           "at the next)",
         "block_tokens": "positions a block of the KV cache holds",
         "kv_blocks": "blocks in the KV cache's pool; 0: enough for every running request to "
                      "fill the context",
         "grace": "seconds that SIGTERM leaves the replies under way to finish"}


def parse_flags(argv):
    return parse_args(argv, STAGE, __doc__, SETTINGS, add_flags, data_help=None, helps=HELPS,
                      outputs=False)


def listening(host, port):
    """One sentence, now, if the address is taken, rather than a server that starts and fails."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): give another "
                            "--port, or --host") from None


def main(argv=None):
    args = parse_flags(argv)
    device = select_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    listening(args.host, args.port)
    if not args.init_from and not stage_folder(BASE):
        make_base(BASE, [BASE_SCRIPT])
    source = args.init_from or BASE
    model, template = load_model(source)
    if model.lora:
        model = merge(model)
    if model.first_new_row < model.config.vocab_size:
        raise UserError(f"{source} holds a model with no chat template yet "
                        f"({trained_at(Path(source) / 'ckpt.pt')}): serve a chat model, a run "
                        "of stage 08 to 11, or a Llama or Qwen3 chat model")
    model.eval().to(device)
    name = Path(source).resolve().name if Path(source).exists() else source
    engine = Engine(model, template, args, device)
    thread = threading.Thread(target=engine.loop, daemon=True)
    thread.start()
    server = uvicorn.Server(uvicorn.Config(make_app(engine, template, name, args), host=args.host,
                                           port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.grace))
    print(f"serving {name} at http://{args.host}:{args.port}/ (a chat page) and OpenAI's API at "
          f"http://{args.host}:{args.port}/v1, {model.block_size} tokens of context, "
          f"{engine.blocks} blocks of {args.block_tokens} positions in the KV cache; Ctrl-C or "
          "SIGTERM stops it, the replies under way first", flush=True)
    # uvicorn stops on SIGTERM once the replies under way are done, then raises it again: then
    # it is done with, and the server exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    engine.stop()
    thread.join()


if __name__ == "__main__":
    run(main, notebook_flags)
