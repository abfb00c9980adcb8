# %% [markdown]
"""06_train_for_real.py: checkpoints, exact resume, signals, torchrun, GPT-2's weights, HellaSwag.

New here, all engineering and no math (with the same flags it prints exactly stage 05's losses):
a checkpoint in --out DIR at every evaluation, written atomically, loaded with weights_only=True,
and never replaced by a new run unless it says --overwrite; --resume, which ends on exactly the
losses of an uninterrupted run (random states, data position and schedule come back); --sample
from a checkpoint, with every sampler flag; Ctrl-C, and the SIGTERM that batch schedulers send
before they kill a job, finish the step, write a checkpoint and say how to resume; a loss that
stops being finite keeps the last good checkpoint; gradient accumulation; several processes or
GPUs under torchrun (DDP over NCCL or Gloo); --init-from OpenAI's GPT-2 weights through Hugging
Face transformers, with a fine-tuning recipe.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: stage 05's losses, val 1.73 after 800 steps, and its samples; the checkpoint is then in
runs/06_train_for_real/ (--out DIR for another folder), and the run says so. Sample from it with
    python 06_train_for_real.py --sample --prompt "ROMEO:" --temperature 0.8 --top-k 40 --top-p 0.95
"""
# %%
import gc
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from shared import UserError, atomic_write, duration, hellaswag, report
from shared.cli import checked, given, hold_out, nonempty, parse_args, run
from shared.data import characters_per_token, check_token_ids, get_batch, load_dataset
from shared.device import all_reduce, build_model, check_memory, select_device, setup_distributed
from shared.hub import pretrained_context, pretrained_model
from shared.tokenizer import TiktokenTokenizer, tokenizer_from_identity

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "06_train_for_real"


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
    # GPT-2 124M again, with build-nanogpt's recipe for 10B tokens of FineWeb-Edu (see the README)
    "gpt2-10b": GPTConfig(n_layer=12, n_head=12, n_embd=768),
}

# Training recipes: one of its own for the cpu and the gpt2-10b presets, `gpu` (the lecture's)
# for the others, `finetune` for pretrained weights (--init-from): a small learning rate, so that
# it adapts, not forgets.
RECIPES = {
    "cpu": dict(batch_size=64, max_iters=800, eval_interval=200, eval_iters=10, lr=4e-3,
                warmup_iters=30, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1),
    "gpu": dict(batch_size=64, max_iters=5000, eval_interval=250, eval_iters=200, lr=1e-3,
                warmup_iters=100, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1),
    # 64 x 1,024 tokens on each of 8 GPUs: 524,288 a step, and 19,073 steps make 10B tokens; on
    # one GPU, --grad-accum-steps 8 makes the same step
    "gpt2-10b": dict(batch_size=64, max_iters=19073, eval_interval=250, eval_iters=20, lr=6e-4,
                     warmup_iters=715, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1),
    "finetune": dict(batch_size=8, max_iters=200, eval_interval=50, eval_iters=20, lr=3e-5,
                     warmup_iters=10, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1),
}


def flag_defaults(preset, init_from=None):
    """The defaults of the flags for a preset: its recipe and its model shape. Pretrained weights
    bring their own shape, so with init_from only the context (to crop to) and dropout remain."""
    if init_from:
        return {**RECIPES["finetune"], "block_size": 1024, "dropout": 0.0}
    config = PRESETS[preset]
    return {**RECIPES.get(preset, RECIPES["gpu"]), "block_size": config.block_size,
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

    @classmethod
    def empty(cls, config):
        """The model with its weights allocated but not filled, for weights about to be copied in:
        filling hundreds of millions of weights with random numbers takes longer than loading
        them."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        # to_empty gives every weight memory of its own, a tied one too: tie it again
        model.lm_head.weight = model.wte.weight
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, block_size=None, dropout=0.0):
        """GPT-2 with OpenAI's weights, through Hugging Face transformers: a hub name (gpt2,
        gpt2-medium, gpt2-large, gpt2-xl) or a folder written by save_pretrained. The shape comes
        with the weights; block_size, if given, crops the context to its first positions."""
        hf_model = pretrained_model(name_or_path, ["gpt2"])
        hf = hf_model.config
        if (block_size or 0) > hf.n_positions:
            raise UserError(f"--block-size {block_size} is longer than {name_or_path}'s context of "
                            f"{hf.n_positions} tokens")
        config = GPTConfig(block_size=block_size or hf.n_positions, vocab_size=hf.vocab_size,
                           n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, dropout=dropout)
        model = cls.empty(config)
        theirs = {name.removeprefix("transformer."): t for name, t in hf_model.state_dict().items()}
        # GPT-2's Conv1D layers store their weight as (in, out), the transpose of nn.Linear's
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
        with torch.no_grad():
            # the tied lm_head comes as wte, once
            for name, p in model.named_parameters():
                tensor = theirs[name].t() if name.endswith(conv1d) else theirs[name]
                if name == "wpe.weight":
                    tensor = tensor[:model.block_size]
                if tensor.shape != p.shape:
                    raise UserError(f"{name_or_path!r} has {name} of shape {tuple(tensor.shape)}, "
                                    f"where this stage's GPT-2 has {tuple(p.shape)}")
                p.copy_(tensor)
        return model


# %% Training

@torch.no_grad()
def estimate_loss(model, splits, args, device):
    """Mean loss over eval_iters batches of each split. The batches are the same at every call
    (a fixed seed), so two estimates differ only because the model changed."""
    was_training = model.training
    model.eval()
    rank = dist.get_rank() if dist.is_initialized() else 0
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(args.seed + rank)
        batches = (get_batch(data, args.batch_size, args.block_size, device, generator)
                   for _ in range(args.eval_iters))
        # a bar once an estimate takes more than 5 s (a large vocabulary, a slow machine)
        batches = tqdm(batches, f"{name} loss", args.eval_iters, leave=False, delay=5)
        loss = sum(model(x, y)[1].item() for x, y in batches) / args.eval_iters
        # the mean over every process's batches
        losses[name] = all_reduce([loss])[0] / args.world_size
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
    tokens = args.batch_size * args.block_size * args.grad_accum_steps * args.world_size
    return (f" | {1000 * step_seconds:.1f} ms/step, {tokens / step_seconds:,.0f}"
            f" tok/s, {duration(left)} left")


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


def train_step(model, optimizer, batches, args, step, scaler):
    """One optimizer step on the mean gradient of the batches (accumulated one after another)
    and, under DDP, of every process's batches; returns their mean loss. In float16 the scaler
    scales the loss up, so that small gradients don't round to zero, and back down before the
    step."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, args)
    total = 0.0
    for i, (x, y) in enumerate(batches):
        # DDP averages gradients across processes during backward; do it only on the last batch
        last = i == len(batches) - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast(args, x.device):
                _, loss = model(x, y)
            # the mean over batches, as if they were one big batch
            scaler.scale(loss / len(batches)).backward()
        total += loss.item() / len(batches)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    model.zero_grad(set_to_none=True)
    return total


class StopOnSignal:
    """While active, a Ctrl-C (SIGINT), or the SIGTERM that batch schedulers send a job before they
    kill it, only asks training to stop after the current step, so that the checkpoint it then
    writes is a consistent state. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.received = None
        self.handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.handlers[signum] = signal.signal(signum, self.request)
        return self

    def request(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step "
              "(Ctrl-C again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)


def train(model, optimizer, train_data, val_data, args, device, chars_per_token, benchmark,
          step, history, on_checkpoint):
    """The optimizer's steps on random batches, with loss estimates (and bits per character, which
    compares tokenizers) every eval_interval steps and a progress line at least every few seconds,
    from `step` on; on_checkpoint(step, history) saves the state after every evaluation and when a
    signal stops training, and says where. Returns the history, the speed and that signal."""
    splits = {"train": train_data, "val": val_data}
    raw_model = model.module if isinstance(model, DDP) else model  # evaluation needs no syncing
    history = list(history)
    start_step = step
    # the history's clock: seconds of this run, resumes included (not the time between them)
    clock = history[-1]["seconds"] if history else 0.0
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    start = time.time()
    eval_seconds = 0.0
    evaluations = 0
    last_line = (step, start, eval_seconds)
    with StopOnSignal() as stop:
        while True:
            due = step % args.eval_interval == 0 or step == args.max_iters
            # a resumed run has the evaluation of its first step already
            if due and (step > start_step or not history):
                eval_start = time.time()
                with autocast(args, device):
                    losses = estimate_loss(raw_model, splits, args, device)
                    # --hellaswag: the benchmark's tokenized examples
                    if benchmark:
                        losses["hellaswag"] = hellaswag.evaluate(raw_model, benchmark,
                                                                 args.batch_size, device)
                check_finite(losses["val"], step)
                eval_seconds += time.time() - eval_start
                evaluations += 1
                seconds = time.time() - start
                bpc = losses["val"] / chars_per_token / math.log(2)
                history.append({"step": step, "seconds": round(clock + seconds, 3), **losses,
                                "val_bpc": bpc})
                print(f"step {step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, val {bpc:.3f} bits/char"
                      + hellaswag.summary(losses.get("hellaswag"))
                      + progress(step, args, last_line, eval_seconds, evaluations), flush=True)
                on_checkpoint(step, history)
                last_line = (step, time.time(), eval_seconds)
            if step >= args.max_iters:
                break
            # every process stops together
            if all_reduce([bool(stop.received)], dist.ReduceOp.MAX)[0]:
                path = on_checkpoint(step, history)
                print(f"stopped at step {step}; saved to {path}: run the same command with "
                      "--resume to go on", flush=True)
                break
            batches = [get_batch(train_data, args.batch_size, args.block_size, device)
                       for _ in range(args.grad_accum_steps)]
            loss = train_step(model, optimizer, batches, args, step, scaler)
            step += 1
            check_finite(all_reduce([loss])[0], step)
            # a line every few seconds between evaluations (which print their own)
            evaluating = step % args.eval_interval == 0 or step == args.max_iters
            if time.time() - last_line[1] > 5 and not evaluating:
                print(f"step {step}: batch loss {loss:.4f}"
                      + progress(step, args, last_line, eval_seconds, evaluations), flush=True)
                last_line = (step, time.time(), eval_seconds)
    seconds = time.time() - start
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum_steps * args.world_size
    tokens = (step - start_step) * tokens_per_step
    return history, tokens / max(seconds - eval_seconds, 1e-9), stop.received



def rng_states():
    """Every process's random state, which decides its next batches (the data position) and its
    dropout masks: a list with one entry per process."""
    cuda = torch.empty(0, dtype=torch.uint8)
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state()
    state = {"cpu": torch.get_rng_state(), "cuda": cuda}
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states, rank, world_size):
    if len(states) != world_size:
        raise UserError(f"the checkpoint was written by {len(states)} process(es); resume with the "
                        f"same number (torchrun --nproc_per_node={len(states)})")
    torch.set_rng_state(states[rank]["cpu"])
    if torch.cuda.is_available() and len(states[rank]["cuda"]):
        torch.cuda.set_rng_state(states[rank]["cuda"])


def save_checkpoint(path, model, optimizer, tokenizer, step, history, rng_states):
    """Everything a run needs to go on where it stopped, as plain tensors, numbers and strings
    (so it loads with weights_only=True), written atomically: a crash mid-write leaves the
    previous checkpoint as it was."""
    checkpoint = {"stage": STAGE, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "config": asdict(model.config), "tokenizer": tokenizer.identity(), "step": step,
                  "history": history, "rng_states": rng_states}
    try:
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
    except OSError as err:
        raise UserError(f"could not write the checkpoint {path} ({err.strerror or err}); "
                        "the previous one, if any, is intact") from None


def read_checkpoint(path):
    """A checkpoint of this stage, loaded with weights_only=True: only tensors and plain data are
    rebuilt, so code hidden in a crafted file never runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train one first with --out {path.parent}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                        "it may be truncated or from elsewhere") from None
    keys = {"stage", "model", "optimizer", "config", "tokenizer", "step", "history", "rng_states"}
    stage = checkpoint.get("stage") if isinstance(checkpoint, dict) else None
    if isinstance(stage, str) and stage != STAGE:
        raise UserError(f"{path} is a checkpoint of {stage}.py, not of {STAGE}.py; "
                        f"sample it with python {stage}.py --sample --out {path.parent}")
    if stage != STAGE or set(checkpoint) != keys:
        raise UserError(f"{path} is not a checkpoint written by this version of {STAGE}.py")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as err:
        raise UserError(f"the weights in {path} don't fit its config ({type(err).__name__}); "
                        f"it was altered or written by another version of {STAGE}.py") from None
    if not all(torch.isfinite(t).all() for t in checkpoint["model"].values()):
        raise UserError(f"the weights in {path} are not all finite numbers; it was altered")
    return model


def check_resumable(checkpoint, args, path):
    """Resuming goes on with the run that stopped: the same tokenizer and model shape."""
    trained = {**checkpoint["config"], "tokenizer": checkpoint["tokenizer"].get("name", "char")}
    for name, value in trained.items():
        if getattr(args, name, None) not in (None, value):
            raise UserError(f"{path} was trained with --{name.replace('_', '-')} {value}, not "
                            f"{getattr(args, name)}; resume with the flags it was trained with")


def load_checkpoint(path):
    """The model (on the CPU, in eval mode) and tokenizer saved in a checkpoint file."""
    checkpoint = read_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path).eval()
    return model, tokenizer_from_identity(checkpoint["tokenizer"])


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
    # unlike stages 01-05, always keep the checkpoint
    parser.set_defaults(out=f"runs/{STAGE}")
    parser.add_argument("--preset", choices=PRESETS, help="model shape and recipe "
                        "(default: cpu on a CPU, shakespeare on a GPU)")
    parser.add_argument("--init-from", type=nonempty("a model"), metavar="NAME|DIR",
                        help="start from GPT-2's weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                        "or a save_pretrained folder (needs transformers)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="autocast precision for training; "
                        "auto: bfloat16 where the hardware has it")
    parser.add_argument("--tokenizer", help="char, a tiktoken encoding such as gpt2, or a Hugging "
                        "Face tokenizer (default: char; gpt2 with --init-from)")
    parser.add_argument("--resume", action="store_true",
                        help="go on training from the checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="let a new run replace the checkpoint already in --out")
    parser.add_argument("--sample", action="store_true",
                        help="only sample, from --out or --init-from")
    parser.add_argument("--hellaswag", nargs="?", const="default", metavar="FILE",
                        help="score HellaSwag at every evaluation, or with --sample instead of "
                        "sampling; FILE: examples in its format (default: its validation set, "
                        "downloaded into data/)")
    parser.add_argument("--prompt", type=nonempty("some text"), help="text the samples start from")
    parser.add_argument("--num-samples", type=checked("num_samples", int), default=1,
                        help="samples per sampler")
    parser.add_argument("--temperature", type=checked("temperature", float), default=1.0,
                        help="0: greedy")
    parser.add_argument("--top-k", type=checked("top_k", int),
                        help="sample from the k likeliest tokens")
    parser.add_argument("--top-p", type=checked("top_p", float),
                        help="sample from the nucleus of mass p")


def parse_flags(argv):
    """The flags, over the defaults of the preset they name (or of the device's), and the preset."""
    args = parse_args(argv, STAGE, __doc__, flag_defaults("cpu"), add_flags, has_attention=True)
    preset = args.preset or ("cpu" if select_device(args.device).type == "cpu" else "shakespeare")
    defaults = flag_defaults(preset, args.init_from)
    args = parse_args(argv, STAGE, __doc__, defaults, add_flags, has_attention=True)
    if args.init_from and not given(argv, "--block-size"):
        # the model's own context, up to 1,024 tokens: a step's memory grows with it
        args.block_size = min(pretrained_context(args.init_from), 1024)
    if args.init_from and args.tokenizer not in (None, "gpt2"):
        raise UserError("GPT-2's weights go with GPT-2's tokens: use --tokenizer gpt2, "
                        "the default with --init-from")
    return args, preset


def checkpoint_path(args):
    return Path(args.out) / "ckpt.pt"


def starting_checkpoint(args):
    """With --resume, the checkpoint to go on from, if it has steps left to train; for a new
    run None, once it is clear that no trained model will be replaced without --overwrite."""
    # no other run may train into --out while this one does
    hold_out(args.out)
    path = checkpoint_path(args)
    if args.resume:
        checkpoint = read_checkpoint(path)
        step = checkpoint["step"]
        if step >= args.max_iters:
            raise UserError(f"{path} has trained its {step} steps of --max-iters; train on with "
                            f"--resume --max-iters {2 * step}, or sample it with --sample")
        return checkpoint
    if path.exists() and not args.overwrite:
        raise UserError(f"{path} holds a trained model ({trained_at(path)}); go on training it "
                        "with --resume, start a new one with another --out, or replace it with "
                        "--overwrite")
    return None


def trained_at(path):
    """Which stage trained the checkpoint at path, and how far, read without loading its weights:
    a memory map of the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"{checkpoint['stage']}.py, step {checkpoint['step']}"
    except Exception:
        return "not readable as a checkpoint of this stage"


def start_processes(args):
    """This process's rank, the number of processes (1 without torchrun) and its device."""
    rank, world_size, device = setup_distributed(select_device(args.device))
    if rank > 0:
        # one process speaks for all
        sys.stdout = open(os.devnull, "w")
    # each process draws its own batches
    torch.manual_seed(args.seed + rank)
    args.world_size = world_size
    args.dtype = resolve_dtype(args.dtype, device)
    return rank, world_size, device


def sample_only(args, device):
    """--sample: samples with the sampler flags, from the checkpoint or from --init-from."""
    if args.init_from:
        model, tokenizer = GPT.from_pretrained(args.init_from), TiktokenTokenizer("gpt2")
    else:
        model, tokenizer = load_checkpoint(checkpoint_path(args))
    prompt = tokenizer.encode(args.prompt) if args.prompt else [0]
    if args.init_from:
        check_token_ids([prompt], model.config.vocab_size, args.init_from)
    model.eval().to(device)
    if args.hellaswag:
        benchmark = hellaswag.load(args.hellaswag, tokenizer, model.block_size)
        scores = hellaswag.evaluate(model, benchmark, args.batch_size, device)
        print(f"{args.init_from or checkpoint_path(args)}{hellaswag.summary(scores)}")
        return
    if args.plot_attention:
        report.plot_attention(model, tokenizer, torch.tensor(prompt), args.out)
    sampler = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print_samples(model, tokenizer, prompt, args, device, {"sample": sampler})


def load_text(args, checkpoint):
    """The tokenizer and the train and val tokens: those the checkpoint was trained on when
    resuming, checked against it."""
    if checkpoint:
        check_resumable(checkpoint, args, checkpoint_path(args))
        args.tokenizer = checkpoint["tokenizer"].get("name", "char")
    args.tokenizer = args.tokenizer or ("gpt2" if args.init_from else "char")
    tokenizer, train_data, val_data = load_dataset(args.data, args.block_size, args.tokenizer)
    if checkpoint and tokenizer.identity() != checkpoint["tokenizer"]:
        raise UserError(f"{checkpoint_path(args)} was trained on another text; "
                        "resume with the same --data")
    return tokenizer, train_data, val_data


def make_model(args, preset, tokenizer, checkpoint, device):
    """The model on the device: the checkpoint's, pretrained weights, or a new one of the preset's
    shape with the flags' sizes; each checked first to fit in the device's memory."""
    if checkpoint or args.init_from:
        # weights already in memory, on the CPU
        if checkpoint:
            model = model_from_checkpoint(checkpoint, checkpoint_path(args))
        else:
            model = GPT.from_pretrained(args.init_from, args.block_size, args.dropout)
        check_memory(model, args, device)
        return model.to(device)
    config = replace(PRESETS[preset], vocab_size=tokenizer.vocab_size, block_size=args.block_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     dropout=args.dropout)
    return build_model(lambda: GPT(config), args, device)


def describe(model, tokenizer, args, device, preset):
    """Print what is trained, where, and on how many tokens a step; return the parameter count."""
    n_params = sum(p.numel() for p in model.parameters())
    source = f"weights {args.init_from}" if args.init_from else f"preset {preset}"
    print(f"{n_params:,} parameters (every weight and bias; a tied head counted once), "
          f"{tokenizer.vocab_size} tokens, on {device} in {args.dtype}; {source}")
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum_steps * args.world_size
    print(f"{args.batch_size} x {args.block_size} tokens x {args.grad_accum_steps} accumulation "
          f"x {args.world_size} process(es) = {tokens_per_step:,} tokens per step")
    return n_params


def train_everywhere(model, optimizer, tokenizer, train_data, val_data, args, device, rank,
                     step, history):
    """train() in every process, DDP keeping their models the same, with checkpoints written by
    rank 0; then the processes leave together. Returns what train() returns."""
    # 1 for characters
    chars_per_token = characters_per_token(tokenizer, val_data)
    benchmark = None
    if args.hellaswag:
        benchmark = hellaswag.load(args.hellaswag, tokenizer, args.block_size)

    def on_checkpoint(step, history):
        # every process takes part
        states = rng_states()
        path = checkpoint_path(args)
        if rank == 0:
            save_checkpoint(path, model, optimizer, tokenizer, step, history, states)
        return path

    ddp_model = DDP(model) if args.world_size > 1 else model
    result = train(ddp_model, optimizer, train_data, val_data, args, device, chars_per_token,
                   benchmark, step, history, on_checkpoint)
    del ddp_model
    if dist.is_initialized():
        # DDP keeps the process group in reference cycles: freed at exit instead, it can abort
        gc.collect()
        # leave together: a process gone early can abort the others' teardown
        dist.barrier()
        dist.destroy_process_group()
    return result


def print_samples(model, tokenizer, prompt, args, device, samplers):
    """args.num_samples samples from each sampler, --batch-size at a time so that any number
    fits."""
    for label, settings in samplers.items():
        for first in range(0, args.num_samples, args.batch_size):
            rows = min(args.batch_size, args.num_samples - first)
            context = torch.tensor([prompt] * rows, device=device)
            for row in generate(model, context, args.max_new_tokens, **settings).tolist():
                print(f"{'-' * 30} {label} {'-' * (49 - len(label))}")
                print(tokenizer.decode(row))


def main(argv=None):
    args, preset = parse_flags(argv)
    rank, world_size, device = start_processes(args)
    if args.sample:
        sample_only(args, device)
        return

    checkpoint = starting_checkpoint(args)
    tokenizer, train_data, val_data = load_text(args, checkpoint)
    # checked before training
    prompt = tokenizer.encode(args.prompt) if args.prompt else [0]
    model = make_model(args, preset, tokenizer, checkpoint, device)
    if args.init_from:
        check_token_ids([train_data, val_data, prompt], model.config.vocab_size, args.init_from)
    optimizer = configure_optimizer(model, args)
    step, history = 0, []
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history = checkpoint["step"], checkpoint["history"]
        set_rng_state(checkpoint["rng_states"], rank, world_size)
        print(f"resuming from step {step} of {checkpoint_path(args)}")
    n_params = describe(model, tokenizer, args, device, preset)

    history, tokens_per_second, stopped_by = train_everywhere(
        model, optimizer, tokenizer, train_data, val_data, args, device, rank, step, history)
    if rank > 0:
        return
    if history:
        path = report.save_metrics(args.out, {
            "stage": STAGE, "config": vars(args), "parameters": n_params,
            "tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size,
            "device": str(device), "history": history, "tokens_per_second": tokens_per_second,
            "train_loss": history[-1]["train"], "val_loss": history[-1]["val"],
            "val_bpc": history[-1]["val_bpc"]})
        print(f"metrics written to {path}")
    if stopped_by == signal.SIGTERM:
        # the job is being stopped: no samples; run() exits with status 143
        return stopped_by
    if args.plot_attention:
        # the val text's first tokens
        report.plot_attention(model, tokenizer, val_data[:32], args.out)

    print_samples(model, tokenizer, prompt, args, device, {
        "greedy": dict(temperature=0), "temperature 0.8": dict(temperature=0.8),
        "top-k 40": dict(top_k=40), "top-p 0.9": dict(top_p=0.9)})
    print(f"the model is in {checkpoint_path(args)}; sample it with python {STAGE}.py --sample "
          f"--out {args.out}")
    # a run Ctrl-C cut short exits with status 130, after its samples
    return stopped_by


if __name__ == "__main__":
    run(main, notebook_flags)
