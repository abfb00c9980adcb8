# %% [markdown]
"""07_modern.py: today's open models: RoPE, RMSNorm, SwiGLU, GQA, QK-norm, Muon, Llama and Qwen3.

New here, in the model, its optimizer and its weights only: rotary positions (RoPE), relative, so
the KV cache slides with the window, never recomputed; RMSNorm; a SwiGLU MLP; grouped-query
attention; QK-norm (Qwen3); no biases; an untied head; a head_dim of its own; Muon, which makes the
updates of the block matrices orthogonal (why: configure_optimizer); --init-from Llama or Qwen3.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: val loss 1.57 after 420 steps of the cpu preset (1.56 on the whole val split), in less
training time than stage 05 takes to reach 1.73 (76 s against 96 s on a slow day of a 2-core
CPU, 31 s against 34 s on a faster one); checkpoint in runs/07_modern/. A real model:
    python 07_modern.py --init-from HuggingFaceTB/SmolLM2-135M --sample --prompt ROMEO: --top-p 0.9
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
from shared.tokenizer import HuggingFaceTokenizer, tokenizer_from_identity

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "07_modern"


# %% Hyperparameters: the flags' defaults (batch_size is --batch-size); edit them in a notebook
# In a notebook this list is the command line: any flag, e.g. ["--data", "poems.txt"]
notebook_flags = []
@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257  # GPT-2's byte-pair vocabulary
    n_layer: int = 12
    n_head: int = 12
    # key/value heads, each shared by n_head / n_kv_head query heads (GQA); 0: n_head
    n_kv_head: int = 0
    n_embd: int = 768
    head_dim: int = 0  # 0: n_embd / n_head; Qwen3-0.6B has 16 heads of 128 in a width of 1,024
    # the MLP's inner width; 0: 8/3 n_embd, up to a multiple of 64 (GPT-2's 4x, in 3 matrices)
    hidden_dim: int = 0
    rope_theta: float = 10000.0  # the base of the rotary positions' wavelengths
    norm_eps: float = 1e-5
    qk_norm: bool = False  # an RMSNorm on every head's queries and keys, as in Qwen3
    tie_embeddings: bool = True  # the LM head and the token embedding one matrix, or two
    dropout: float = 0.0


# Model shapes. vocab_size is set by the tokenizer at training time.
PRESETS = {
    "cpu": GPTConfig(block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, qk_norm=True,
                     tie_embeddings=False),
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
    "cpu": dict(batch_size=64, max_iters=420, eval_interval=210, eval_iters=20, lr=8e-3,
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
            "n_embd": config.n_embd, "n_head": config.n_head,
            "n_kv_head": config.n_kv_head or config.n_head, "n_layer": config.n_layer,
            "dropout": config.dropout}


# %% The model

class KVCache:
    """The keys and values of the last block_size - 1 positions, per layer: one more token costs
    one position's work. RoPE keeps a key's meaning wherever the window is: keys leaving it are
    dropped. position is where the next token goes: the number of positions seen, kept or not."""

    def __init__(self, window, n_layer):
        # with the new position's own key, a query sees window positions
        self.keep = window - 1
        self.n_layer = n_layer
        self.keys, self.values = {}, {}
        self.position = 0

    def update(self, layer, k, v):
        """The layer's keys and values, earlier ones first, with k and v (B, n_kv_head, T,
        head_dim) of T new positions added; once the last layer has them, the cache moves on."""
        new = k.size(2)
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        start = max(0, k.size(2) - self.keep)
        self.keys[layer] = k[:, :, start:]
        self.values[layer] = v[:, :, start:]
        if layer == self.n_layer - 1:
            self.position += new
        return k, v


def rope_table(positions, head_dim, theta):
    """RoPE's angles for the given positions, as cos and sin (T, head_dim) in float32: channels i
    and i + head_dim/2 of a head turn by position / theta^(2i / head_dim), so that a query and a
    key meet at an angle set by how far apart they are, not where. Made once a forward pass and
    shared by every layer."""
    channels = torch.arange(0, head_dim, 2, device=positions.device).float()
    frequencies = 1.0 / theta ** (channels / head_dim)
    angles = (positions[:, None].float() * frequencies).repeat(1, 2)
    return angles.cos(), angles.sin()


def rotate(x, rope):
    """x (B, heads, T, head_dim) turned by rope_table's angles: each pair of channels i and
    i + head_dim/2 as a point in a plane."""
    cos, sin = rope
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """All heads at once: q_proj, k_proj and v_proj make the queries, keys and values of every
    head."""

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        self.theta = config.rope_theta
        self.window = config.block_size
        self.dropout = config.dropout
        # separate matrices, as Muon orthogonalizes each on its own
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        # output projection
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x, rope):
        """Queries (B, n_head, T, head_dim), keys and values (B, n_kv_head, T, head_dim); the
        queries and keys normed and rotated in float32."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q = self.q_norm(q.float()).transpose(1, 2)
        k = self.k_norm(k.float()).transpose(1, 2)
        return rotate(q, rope), rotate(k, rope), v.transpose(1, 2)

    def forward(self, x, rope, cache=None):
        B, T, C = x.shape
        q, k, v = self.heads(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # prepend the earlier positions' keys and values
        bfloat16_on_cpu = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        # more keys than the window (a prompt longer than block_size): each query may see only
        # the window before it, a mask the fused kernel can't take
        if bfloat16_on_cpu or k.size(2) > self.window:
            # on a CPU, PyTorch's fused kernel is slow in bfloat16 (forward and backward 2.7x
            # slower than in float32, measured), while spelled out in bfloat16 products it is
            # faster than both
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            weights = causal_attention_weights(q, k, self.window)
            y = F.dropout(weights, self.dropout, self.training) @ v
        else:
            # the masked softmax of stage 04 in one fused kernel; new queries may see every
            # cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # heads side by side again
        return self.resid_dropout(self.o_proj(y))

    def attention_weights(self, x):
        """The weights the fused kernel applies but never returns, for looking at
        (--plot-attention): (B, n_head, T, T)."""
        positions = torch.arange(x.size(1), device=x.device)
        q, k, _ = self.heads(x, rope_table(positions, self.head_dim, self.theta))
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return causal_attention_weights(q, k, self.window)


def causal_attention_weights(q, k, window):
    """Stage 04's masked softmax for all heads at once, (B, n_head, T, S): each of the T queries
    sees the keys up to its own position, the last T of the S keys lining up with the queries, and
    no further back than the window."""
    T, S = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device)
    causal = causal.tril(S - T).triu(S - T - window + 1)
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


class MLP(nn.Module):
    """The same small network applied at every position: attention gathers, the MLP computes.
    SwiGLU: a second projection of x, through SiLU, gates the first elementwise."""

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_dim or 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Attention then an MLP, each reading an RMSNorm of x (pre-norm) and adding onto x."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache=None):
        # the residual path x + ... carries the gradient straight down, so deep stacks still train
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


def unsupported(hf):
    """What a Llama or Qwen3 config asks for that this stage's model does not do; None if
    nothing."""
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"scales its RoPE ({rope['rope_type']})"
    if getattr(hf, "use_sliding_window", False):
        return "has sliding-window attention"
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        return "has biases in its attention or MLP"
    if hf.hidden_act != "silu":
        return f"gates its MLP with {hf.hidden_act}, not SiLU"
    return None


# our module names and Hugging Face's: h.0.attn.q_proj is model.layers.0.self_attn.q_proj
RENAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm", "h": "model.layers",
           "attn": "self_attn", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}


def hugging_face_name(name):
    """The Hugging Face name of one of our weights."""
    return ".".join(RENAMES.get(part, part) for part in name.split("."))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = nn.RMSNorm(config.n_embd, config.norm_eps)  # final RMSNorm
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: reading a token in and writing one out use the same matrix (as in GPT-2)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # the layers that write into the residual stream start at zero: every block starts as
        # the identity
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p)

    def _init_weights(self, module):
        # small weights give every token about the same probability at first: loss ~ ln(vocab_size)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        # idx and targets: (B, T) token ids; with a cache, idx holds only the positions after it
        start = cache.position if cache is not None else 0
        positions = torch.arange(start, start + idx.size(1), device=idx.device)
        # positions come in each attention, by RoPE: one table of angles for every layer
        rope = rope_table(positions, self.head_dim, self.config.rope_theta)
        x = self.drop(self.wte(idx))  # (B, T, n_embd)
        for block in self.h:
            x = block(x, rope, cache)
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
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, block_size=None, dropout=0.0):
        """A Llama or Qwen3 model with its weights, through Hugging Face transformers: a hub name
        (such as HuggingFaceTB/SmolLM2-135M or Qwen/Qwen3-0.6B) or a folder written by
        save_pretrained. The shape comes with the weights; block_size, if given, crops the
        context to its first positions."""
        hf_model = pretrained_model(name_or_path, ["llama", "qwen3"])
        hf = hf_model.config
        reason = unsupported(hf)
        if reason:
            raise UserError(f"{name_or_path!r} {reason}; this stage loads Llama and Qwen3 models "
                            "with plain RoPE, full attention and no biases")
        if (block_size or 0) > hf.max_position_embeddings:
            raise UserError(f"--block-size {block_size} is longer than {name_or_path}'s context of "
                            f"{hf.max_position_embeddings} tokens")
        config = GPTConfig(block_size=block_size or hf.max_position_embeddings,
                           vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers,
                           n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads,
                           n_embd=hf.hidden_size, head_dim=hf.head_dim,
                           hidden_dim=hf.intermediate_size,
                           rope_theta=hf.rope_parameters["rope_theta"], norm_eps=hf.rms_norm_eps,
                           qk_norm=hf.model_type == "qwen3", tie_embeddings=hf.tie_word_embeddings,
                           dropout=dropout)
        model = cls.empty(config)
        theirs = hf_model.state_dict()
        with torch.no_grad():
            # a tied lm_head comes as wte, once
            for name, p in model.named_parameters():
                tensor = theirs[hugging_face_name(name)]
                if tensor.shape != p.shape:
                    raise UserError(f"{name_or_path!r} has {name} of shape {tuple(tensor.shape)}, "
                                    f"where this stage's model has {tuple(p.shape)}")
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


class Optimizers:
    """Optimizers of disjoint sets of parameters, stepped, zeroed and saved as one."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # looked up each time: loading a state replaces an optimizer's groups
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states):
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)


def configure_optimizer(model, args):
    """Muon for the weight matrices inside the blocks, AdamW for the rest; weight decay on matrices
    only. Muon replaces a matrix's update (its momentum) by the nearest orthogonal matrix (a few
    Newton-Schulz iterations), so every direction it maps moves alike, not the few that dominate the
    gradient: right for a map from vectors to vectors, not for an embedding table, a head or a gain.
    Sized as AdamW's updates are (match_rms_adamw), it shares their learning rate and schedule."""
    hidden = [p for name, p in model.named_parameters() if name.startswith("h.") and p.dim() == 2]
    # the rest, for AdamW
    params = [p for p in model.parameters() if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # momentum 0.9: 0.95 was worse here
    muon = torch.optim.Muon(hidden, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9,
                            adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99)))


def learning_rate(step, args):
    """Linear warm-up to lr, then a linear decay to 0 (measured: better with Muon than a cosine to
    lr / 10)."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr * (1 - min(progress, 1.0))


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
    reads, at every position, that position and the block_size - 1 before it: a window moving on
    with each token. With the KV cache each step feeds only the newest token, and keys that leave
    the window are dropped, never computed again. Both ways give the same tokens."""
    was_training = model.training
    model.eval()
    cache = None
    # a bar once sampling takes more than 5 s
    for _ in tqdm(range(max_new_tokens), "sampling", leave=False, delay=5):
        if use_cache and cache is not None:
            logits, _ = model(idx[:, -1:], cache=cache)  # (B, 1, vocab_size)
        else:
            cache = KVCache(model.block_size, len(model.h)) if use_cache else None
            logits, _ = model(idx, cache=cache)  # (B, T, vocab_size)
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
                        help="start from a Llama or Qwen3 model: a Hugging Face hub name or a "
                        "save_pretrained folder (needs transformers)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="autocast precision for training; "
                        "auto: bfloat16 where the hardware has it")
    parser.add_argument("--tokenizer", help="char, a tiktoken encoding such as gpt2, or a Hugging "
                        "Face tokenizer (default: char; with --init-from, the model's own)")
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
    if args.init_from and args.tokenizer not in (None, args.init_from):
        raise UserError("a model's weights go with its own tokenizer: "
                        "leave out --tokenizer with --init-from")
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
        model = GPT.from_pretrained(args.init_from)
        tokenizer = HuggingFaceTokenizer(args.init_from)
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
    args.tokenizer = args.tokenizer or args.init_from or "char"
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
                     n_kv_head=args.n_kv_head, dropout=args.dropout)
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
