# %% [markdown]
"""05_gpt.py: GPT-2, its training recipe, and four ways to sample from it.

New here: the model is now exactly GPT-2 (one Linear makes every head's queries, keys and values;
PyTorch's fused scaled_dot_product_attention; GELU; biases; the LM head tied to the token
embedding; GPT-2's initialisation), in any size up to GPT-2 XL (--preset); GPT-2's recipe (AdamW
with weight decay on the weight matrices only, warm-up then cosine decay, gradient clipping), in
bfloat16 where the hardware computes in it natively (--dtype); characters or GPT-2's byte-pair
tokens (--tokenizer gpt2), compared in bits per character; four samplers (greedy, temperature,
top-k, top-p) and a KV cache.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: val loss 1.73 (2.50 bits/char) after 800 steps of the cpu preset, in 42 s on a 2-core CPU
with native bfloat16; then a sample from each sampler (greedy decoding soon repeats itself).
"""
# %%
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from shared import UserError, duration, report
from shared.cli import parse_args, run
from shared.data import get_batch, load_dataset
from shared.device import build_model, select_device

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "05_gpt"


# %% Hyperparameters: the flags' defaults (batch_size is --batch-size); edit them in a notebook
# In a notebook this list is the command line: any flag, e.g. ["--data", "poems.txt"]
notebook_flags = []
@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257  # GPT-2's byte-pair vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear layers and LayerNorms, as in GPT-2
    gelu: str = "tanh"  # GPT-2's tanh approximation of GELU, or "none": the exact (erf) GELU


# Model shapes. vocab_size is set by the tokenizer at training time.
PRESETS = {
    # the exact GELU: 2.6x faster than GPT-2's tanh form on a CPU (measured), and free to use when
    # training from scratch
    "cpu": GPTConfig(block_size=64, n_layer=3, n_head=4, n_embd=128, gelu="none"),
    "shakespeare": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}

# Training recipes: `cpu` for the cpu preset, `gpu` (the lecture's) for the others.
RECIPES = {
    "cpu": dict(batch_size=64, max_iters=800, eval_interval=200, eval_iters=10, lr=4e-3,
                warmup_iters=30, weight_decay=0.1, grad_clip=1.0),
    "gpu": dict(batch_size=64, max_iters=5000, eval_interval=250, eval_iters=200, lr=1e-3,
                warmup_iters=100, weight_decay=0.1, grad_clip=1.0),
}


def flag_defaults(preset):
    """The defaults of the flags for a preset: its recipe and its model shape."""
    config = PRESETS[preset]
    return {**RECIPES["cpu" if preset == "cpu" else "gpu"], "block_size": config.block_size,
            "n_embd": config.n_embd, "n_head": config.n_head, "n_layer": config.n_layer,
            "dropout": config.dropout}


# %% The model

class KVCache:
    """The keys and values of every position seen so far, per layer, so that generating one more
    token costs the work of one position instead of the whole context."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def __len__(self):
        return self.keys[0].size(2) if self.keys else 0

    def update(self, layer, k, v):
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """All heads at once: one Linear makes queries, keys and values for every head (c_attn)."""

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # output projection
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x):  # queries, keys and values of every head: (B, n_head, T, head_size) each
        B, T, C = x.shape
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                for t in self.c_attn(x).split(C, dim=2))

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.heads(x)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # prepend the earlier positions' keys and values
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # on a CPU, PyTorch's fused kernel is slow in bfloat16 (forward and backward 2.7x
            # slower than in float32, measured), while spelled out in bfloat16 products it is
            # faster than both
            y = F.dropout(causal_attention_weights(q, k), self.dropout, self.training) @ v
        else:
            # the masked softmax of stage 04 in one fused kernel; new queries may see every
            # cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attention_weights(self, x):
        """The weights the fused kernel applies but never returns, for looking at
        (--plot-attention): (B, n_head, T, T)."""
        q, k, _ = self.heads(x)
        return causal_attention_weights(q, k)


def causal_attention_weights(q, k):
    """Stage 04's masked softmax for all heads at once, (B, n_head, T, S): each of the T queries
    sees the keys up to its own position, the last T of the S keys lining up with the queries."""
    T, S = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


class MLP(nn.Module):
    """The same small network applied at every position: attention gathers, the MLP computes."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Attention then an MLP, each reading a LayerNorm of x (pre-norm) and adding onto x."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # the residual path x + ... carries the gradient straight down, so deep stacks still train
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)  # final LayerNorm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: reading a token in and writing one out use the same matrix (as in GPT-2)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the layers that write into the residual stream by 1/sqrt(2 * n_layer), so
        # the stream's variance doesn't grow with depth (two such writes per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # small weights give every token about the same probability at first: loss ~ ln(vocab_size)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        # idx and targets: (B, T) token ids; with a cache, idx holds only the positions after it
        start = len(cache) if cache is not None else 0
        positions = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, n_embd)
        for block in self.h:
            x = block(x, cache)
        x = self.ln_f(x)  # (B, T, n_embd)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# %% Training

@torch.no_grad()
def estimate_loss(model, splits, args, device):
    """Mean loss over eval_iters batches of each split. The batches are the same at every call
    (a fixed seed), so two estimates differ only because the model changed."""
    was_training = model.training
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(args.seed)
        batches = (get_batch(data, args.batch_size, args.block_size, device, generator)
                   for _ in range(args.eval_iters))
        # a bar once an estimate takes more than 5 s (a large vocabulary, a slow machine)
        batches = tqdm(batches, f"{name} loss", args.eval_iters, leave=False, delay=5)
        losses[name] = sum(model(x, y)[1].item() for x, y in batches) / args.eval_iters
    model.train(was_training)
    return losses


def progress(step, args, last_line, eval_seconds, evaluations):
    """Speed of the training steps since the last line printed (last_line: its step, time and
    seconds of evaluation so far), and how long the rest of the run will take: the steps left at
    that speed, and the evaluations left at what each took so far (this run has made evaluations
    of them, in eval_seconds). After a stall, the next line is right again."""
    last_step, last_time, last_eval_seconds = last_line
    if step == last_step:
        return ""
    train_seconds = time.time() - last_time - (eval_seconds - last_eval_seconds)
    step_seconds = max(train_seconds, 1e-9) / (step - last_step)
    # the evaluations to come: every eval_interval steps, and at the last step
    evaluations_left = sum(1 for later in range(step + 1, args.max_iters + 1)
                           if later % args.eval_interval == 0 or later == args.max_iters)
    left = (step_seconds * (args.max_iters - step)
            + evaluations_left * eval_seconds / max(evaluations, 1))
    tokens_per_second = args.batch_size * args.block_size / step_seconds
    return (f" | {1000 * step_seconds:.1f} ms/step, {tokens_per_second:,.0f} tok/s,"
            f" {duration(left)} left")


def check_finite(loss, step):
    """Stop at the first loss that is inf or NaN: the run has diverged, and what would follow
    (sampling, the metrics, the pictures) would only fail on it."""
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} at step {step}: training diverged; "
                        "try a smaller --lr")


def resolve_dtype(name, device):
    """auto: bfloat16 where the hardware multiplies in it natively (recent CUDA GPUs, CPUs with
    AVX-512 BF16 or AMX), float32 elsewhere."""
    if name == "float16" and device.type == "cpu":
        print("warning: --dtype float16 is for GPUs: CPUs have little or no fast float16 "
              "arithmetic, and it needs loss scaling; on a CPU, bfloat16 is the 16-bit type to use "
              "(what --dtype auto picks where the CPU multiplies in it)", file=sys.stderr)
    if name != "auto":
        return name
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                           or torch.cpu._is_amx_tile_supported())
    return "bfloat16" if native else "float32"


def autocast(args, device):
    """Matrix products in args.dtype, with the weights, the optimizer and the numerically delicate
    ops (softmax, LayerNorm, the loss) kept in float32: mixed precision."""
    dtype = getattr(torch, args.dtype)
    return torch.autocast(device.type, dtype=dtype, enabled=args.dtype != "float32")


def configure_optimizer(model, args):
    """AdamW; weight decay on the matrices (2-D parameters: Linear weights and both embeddings; the
    token embedding is the output layer too), none on biases and LayerNorm gains, where pulling
    toward zero would only shift and shrink activations."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))


def learning_rate(step, args):
    """Linear warm-up to lr, then a cosine decay to lr / 10 at max_iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    min_lr = args.lr / 10
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.lr - min_lr)


def train(model, train_data, val_data, args, device, chars_per_token):
    """AdamW on random batches, with loss estimates (and bits per character, which compares
    tokenizers) every eval_interval steps and a progress line at least every few seconds. Ctrl-C
    stops early and keeps what the model has learned."""
    optimizer = configure_optimizer(model, args)
    splits = {"train": train_data, "val": val_data}
    history = []
    start = time.time()
    eval_seconds = 0.0
    evaluations = 0
    last_line = (0, start, eval_seconds)
    step = 0
    try:
        while True:
            if step % args.eval_interval == 0 or step == args.max_iters:
                eval_start = time.time()
                with autocast(args, device):
                    losses = estimate_loss(model, splits, args, device)
                check_finite(losses["val"], step)
                eval_seconds += time.time() - eval_start
                evaluations += 1
                seconds = time.time() - start
                bpc = losses["val"] / chars_per_token / math.log(2)
                history.append({"step": step, "seconds": round(seconds, 3), **losses,
                                "val_bpc": bpc})
                print(f"step {step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, val {bpc:.3f} bits/char"
                      + progress(step, args, last_line, eval_seconds, evaluations), flush=True)
                last_line = (step, time.time(), eval_seconds)
            if step == args.max_iters:
                break
            x, y = get_batch(train_data, args.batch_size, args.block_size, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            with autocast(args, device):
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            check_finite(loss.item(), step)
            # a line every few seconds between evaluations (which print their own)
            evaluating = step % args.eval_interval == 0 or step == args.max_iters
            if time.time() - last_line[1] > 5 and not evaluating:
                print(f"step {step}: batch loss {loss.item():.4f}"
                      + progress(step, args, last_line, eval_seconds, evaluations), flush=True)
                last_line = (step, time.time(), eval_seconds)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; going on with the model as it is")
    seconds = time.time() - start
    tokens_per_second = step * args.batch_size * args.block_size / max(seconds - eval_seconds, 1e-9)
    return history, tokens_per_second


# %% Sampling

def greedy(logits):
    """The most likely token of each row of (B, V) logits, as a (B, 1) tensor."""
    return logits.argmax(dim=-1, keepdim=True)


def top_k_filter(logits, k):
    """Keep the k largest logits of each row, exactly k even when values tie; -inf elsewhere."""
    values, indices = torch.topk(logits, min(k, logits.size(-1)), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits, p):
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p (the
    nucleus): the token that crosses p stays in, and so does the top token, whatever p is."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    sorted_logits[mass_before >= p] = float("-inf")  # never the top token: its mass_before is 0
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_indices, sorted_logits)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """The next token for each row of (B, V) logits: greedy at temperature 0; otherwise scale by
    the temperature, keep the top k, keep the nucleus p, and draw."""
    if temperature == 0:
        return greedy(logits)
    # the top logit at 0, and no temperature below what the dtype can divide by: never inf - inf
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             use_cache=True):
    """Extend each row of idx, a (B, T) tensor of token ids, by max_new_tokens tokens. The model
    reads a window of the latest tokens that, once longer than block_size, moves on to keep its
    newer half. With the KV cache each step feeds only the newest token; the window is computed
    again only when it moves (every position shifts then). Both ways give the same tokens."""
    was_training = model.training
    model.eval()
    start, cache = 0, None
    # a bar once sampling takes more than 5 s
    for _ in tqdm(range(max_new_tokens), "sampling", leave=False, delay=5):
        if idx.size(1) - start > model.block_size:
            start, cache = idx.size(1) - max(1, model.block_size // 2), None
        if use_cache and cache is not None:
            logits, _ = model(idx[:, -1:], cache=cache)  # (B, 1, vocab_size)
        else:
            cache = KVCache() if use_cache else None
            logits, _ = model(idx[:, start:], cache=cache)  # (B, T, vocab_size)
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
    model.train(was_training)
    return idx


# %% [markdown]
# ## Run it
# From a terminal, run this file with python; its flags change the hyperparameters (`--help`
# lists them). In a notebook, edit the hyperparameters cell above, its values or
# notebook_flags, and run all the cells again.

# %% Train, then sample
def add_flags(parser):
    parser.add_argument("--preset", choices=PRESETS, help="model shape and recipe "
                        "(default: cpu on a CPU, shakespeare on a GPU)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="autocast precision for training; "
                        "auto: bfloat16 where the hardware has it")
    parser.add_argument("--tokenizer", default="char",
                        help="char, a tiktoken encoding such as gpt2, or a Hugging Face tokenizer")


def main(argv=None):
    args = parse_args(argv, STAGE, __doc__, flag_defaults("cpu"), add_flags, has_attention=True)
    preset = args.preset or ("cpu" if select_device(args.device).type == "cpu" else "shakespeare")
    args = parse_args(argv, STAGE, __doc__, flag_defaults(preset), add_flags, has_attention=True)
    torch.manual_seed(args.seed)
    device = select_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    tokenizer, train_data, val_data = load_dataset(args.data, args.block_size, args.tokenizer)
    config = replace(PRESETS[preset], vocab_size=tokenizer.vocab_size, block_size=args.block_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     dropout=args.dropout)
    model = build_model(lambda: GPT(config), args, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters (every weight and bias; a tied wte/lm_head once), "
          f"{tokenizer.vocab_size} tokens, on {device} in {args.dtype}; preset {preset}")
    chars_per_token = len(tokenizer.decode(val_data.tolist())) / len(val_data)  # 1 for characters

    history, tokens_per_second = train(model, train_data, val_data, args, device, chars_per_token)
    if args.out and history:
        path = report.save_metrics(args.out, {
            "stage": STAGE, "config": vars(args), "parameters": n_params,
            "tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size,
            "device": str(device), "history": history, "tokens_per_second": tokens_per_second,
            "train_loss": history[-1]["train"], "val_loss": history[-1]["val"],
            "val_bpc": history[-1]["val_bpc"]})
        print(f"metrics written to {path}")
    if args.plot_attention:
        # the val text's first tokens
        report.plot_attention(model, tokenizer, val_data[:32], args.out or ".")

    # token 0: '\n' in Tiny Shakespeare
    context = torch.zeros((1, 1), dtype=torch.long, device=device)
    for label, settings in {"greedy": dict(temperature=0), "temperature 0.8": dict(temperature=0.8),
                            "top-k 40": dict(top_k=40), "top-p 0.9": dict(top_p=0.9)}.items():
        print(f"{'-' * 30} {label} {'-' * (49 - len(label))}")
        tokens = generate(model, context, args.max_new_tokens, **settings)[0]
        print(tokenizer.decode(tokens.tolist()))


if __name__ == "__main__":
    run(main, notebook_flags)
