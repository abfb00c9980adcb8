# %% [markdown]
"""09_lora.py: LoRA: fine-tune what your machine can't fully train, then merge and export it.

New here, in fine-tuning only: each weight matrix W of the blocks stays frozen, and beside it two
thin matrices train, B (out x r) and A (r x in): the layer computes W x + (alpha / r) B A x (Hu et
al. 2021). A weight costs 16 bytes to train with AdamW, 4 to keep: training few, a step on a model
of Qwen3-0.6B's shape took 5.2 GB and 3.4 s here, not 10.3 GB and 34.6 s. Adapters go on every
projection (peft's default for Llama and Qwen3: q_proj and v_proj only), trained by Muon (AdamW
learned less here); a chat template's new tokens train their rows. A checkpoint holds the
adapters and its base's digest; --merge folds them in: a model alone, which stage 08 reads too,
and of a Hugging Face model a save_pretrained folder. --lora-rank 0 is stage 08.

The adapters go on the model stage 08 fine-tunes in full: --init-from a run of stage 07 or 08
(by default stage 07's default run, runs/07_modern, made first if it is not there) or a Llama or
Qwen3 model.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: 80 steps of LoRA on stage 07's model, on Tiny Shakespeare's dialogue: val loss on the
replies 2.41 -> 1.47 (stage 08: 1.71); of 50 replies to val conversations, 2 ended their turn
within 500 tokens before, 50 after; 11 s on a 2-core CPU, where stage 08 took 12 s.
Checkpoint in runs/09_lora/. Then talk to it:
    python 09_lora.py --chat
"""
# %%
import gc
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from shared import ROOT, UserError, atomic_write, duration, report
from shared.cli import checked, given, hold_out, nonempty, parse_args, run
from shared.conversations import HuggingFaceChat, load_conversations
from shared.data import characters_per_token, check_token_ids
from shared.device import all_reduce, check_memory, select_device, setup_distributed
from shared.hub import export_pretrained, pretrained_context, pretrained_model, weights_digest
from shared.tokenizer import HuggingFaceTokenizer, tokenizer_from_identity

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "09_lora"
# without --init-from, fine-tuning starts from the default run of stage 07, made first if missing
BASE_SCRIPT = "07_modern.py"
BASE = "runs/07_modern"


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


# Fine-tuning recipes: `chat` for a model of ours, `finetune` for a Hugging Face model: a small
# learning rate, so that it adapts, not forgets.
RECIPES = {
    "chat": dict(batch_size=32, max_iters=80, eval_interval=20, eval_iters=8, lr=5e-4,
                 warmup_iters=10, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1,
                 dropout=0.0),
    "finetune": dict(batch_size=8, max_iters=200, eval_interval=50, eval_iters=20, lr=3e-5,
                     warmup_iters=10, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1,
                     dropout=0.0),
}


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
        # add_lora's settings; None: every weight trains
        self.lora = None
        # the rows of the embedding and the head from here on are new to the weights, untrained:
        # those grow_vocabulary adds for a chat template's tokens
        self.first_new_row = config.vocab_size
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
        # the mean over the positions that have a target (-1: none, as in a user's message);
        # a batch with none gives 0, not 0 / 0
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction="sum")
        return logits, loss / (targets != -1).sum().clamp(min=1)

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


def grow_vocabulary(model, vocab_size):
    """The model with vocab_size rows in its embedding and head, for a chat template's tokens,
    each new row the mean of the old: a new token's logit is then the mean logit, a small
    probability, so the text the model knew keeps its probabilities and the new tokens start at
    a moderate loss (a random row could start one loud or silent)."""
    if model.config.vocab_size >= vocab_size:
        return model
    state = model.state_dict()
    for name in ("wte.weight", "lm_head.weight"):
        rows = state[name]
        state[name] = torch.cat((rows, rows.mean(dim=0).expand(vocab_size - len(rows), -1)))
    grown = GPT(replace(model.config, vocab_size=vocab_size))
    grown.load_state_dict(state)
    grown.first_new_row = model.first_new_row
    return grown


# a block's matrices that can take an adapter
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# where a chat template's new tokens have rows
TABLES = ["wte.weight", "lm_head.weight"]


class LoRALinear(nn.Module):
    """W x + (alpha / r) B A x: a linear layer's weight W, frozen, and an update of rank r, B (out,
    r) times A (r, in). B starts at zero, so the layer starts as W; A random, as in peft, or B
    would get no gradient. W keeps its name, so that the base's state dict fits."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        # off: the layer is W alone (adapters_off)
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight)
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + self.scale * update

    def merged_weight(self):
        return self.weight + self.scale * self.lora_B @ self.lora_A


def add_lora(model, lora):
    """The model, frozen, with a LoRALinear on lora's targets in every block. The rows of the
    embedding and the head from lora["first_new_row"] on (a chat template's tokens) train too: a
    hook zeroes the other rows' gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, block in enumerate(model.h):
        for name in lora["lora_targets"]:
            part = "attn" if name in TARGETS[:4] else "mlp"
            parent = getattr(block, part)
            linear = getattr(parent, name)
            height, width = linear.weight.shape
            if lora["lora_rank"] > min(height, width):
                raise UserError(f"--lora-rank {lora['lora_rank']} is more than "
                                f"h.{layer}.{part}.{name} ({height} x {width}) can take")
            setattr(parent, name, LoRALinear(linear, lora["lora_rank"], lora["lora_alpha"],
                                             lora["lora_dropout"]))
    rows = torch.arange(model.config.vocab_size)[:, None] >= lora["first_new_row"]
    if rows.any():
        # with tied weights, the embedding and the head are one table
        for table in {model.wte.weight, model.lm_head.weight}:
            table.requires_grad_(True)
            table.register_hook(lambda grad: grad * rows.to(grad))
    model.lora = lora
    return model


def adapter_state(model):
    """What trains, all a LoRA checkpoint holds of the model: the adapters and the new rows."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad and name in TABLES:
            state[name] = p.detach()[model.lora["first_new_row"]:]
        elif p.requires_grad:
            state[name] = p.detach()
    return state


def merge(model):
    """A plain GPT computing what the model computes: each adapter folded into its weight."""
    state = {name: t for name, t in model.state_dict().items() if "lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight().detach()
    merged = GPT(model.config)
    merged.load_state_dict(state)
    return merged


@contextmanager
def adapters_off(model):
    """The model as its base computes it, in eval mode, while the block runs: every adapter
    switched off (peft's disable_adapter). The base is then there without a second copy in
    memory, as the reference that preference tuning and RL measure the model against."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        model.train(was_training)


# %% Training

class ChatTemplate:
    """A token before each message names who speaks and one after ends the turn:
    <|user|>Good morrow.<|end|><|assistant|>Good morrow, sir.<|end|>. They are new tokens after
    the tokenizer's, so that no text can make them."""

    markers = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = {marker: tokenizer.vocab_size + i for i, marker in enumerate(self.markers)}
        self.vocab_size = tokenizer.vocab_size + len(self.markers)
        self.end = self.ids["<|end|>"]
        self.special = set(self.ids.values())

    def render(self, messages, reply_next=False):
        """The token ids and, for each, whether it is learned: the assistant's text and its
        <|end|>, nothing else. reply_next adds <|assistant|>, the prompt for a reply."""
        ids, learned = [], []
        for message in messages:
            text = [*self.tokenizer.encode(message["content"]), self.end]
            ids += [self.ids[f"<|{message['role']}|>"], *text]
            learned += [False] + [message["role"] == "assistant"] * len(text)
        if reply_next:
            ids.append(self.ids["<|assistant|>"])
            learned.append(False)
        return ids, learned

    def decode(self, ids):
        """The text of ids, the markers left out."""
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

    def identity(self):
        return self.tokenizer.identity()


def fit(template, conversations, block_size):
    """Conversations as examples of block_size + 1 tokens (inputs all but the last, targets all
    but the first), each cut after the last reply that fits, or dropped if none does, and padded.
    Returns the inputs and targets (-1 where nothing is learned), and how many were cut and
    dropped."""
    rows, cut, dropped = [], 0, 0
    for messages in conversations:
        ids, learned = template.render(messages)
        # a reply ends after its learned end token
        ends = [i + 1 for i, token in enumerate(ids) if token == template.end and learned[i]]
        fitting = [end for end in ends if end <= block_size + 1]
        if not fitting:
            dropped += 1
            continue
        cut += fitting[-1] < ends[-1]
        padding = block_size + 1 - fitting[-1]
        rows.append((ids[:fitting[-1]] + [template.end] * padding,
                     learned[:fitting[-1]] + [False] * padding))
    ids = torch.tensor([row for row, _ in rows], dtype=torch.long).view(-1, block_size + 1)
    learned = torch.tensor([row for _, row in rows], dtype=torch.bool).view(-1, block_size + 1)
    targets = ids[:, 1:].masked_fill(~learned[:, 1:], -1)
    return (ids[:, :-1], targets), cut, dropped


def fine_tuning_data(args, template, train, val):
    """fit's examples of the train and val conversations, with what was cut or dropped said, and
    the context that would keep every one."""
    splits = []
    for name, part in (("train", train), ("val", val)):
        data, cut, dropped = fit(template, part, args.block_size)
        plural = "" if len(part) == 1 else "s"
        print(f"{name}: {len(part):,} conversation{plural}; in {args.block_size} tokens, "
              f"{cut:,} cut after a reply, {dropped:,} dropped (their first reply does not fit)")
        if dropped:
            # a reply ends after its end token; an example is block_size + 1 tokens
            needed = max(len(template.render(messages)[0]) for messages in part) - 1
            print(f"  --block-size {needed:,} would keep all of them whole, with a model that "
                  "reads that far")
        if not len(data[0]):
            raise UserError(f"no {name} conversation has a first reply that fits in "
                            f"--block-size {args.block_size} tokens; give a longer one")
        splits.append(data)
    return splits


def get_batch(data, batch_size, block_size, device, generator=None):
    """batch_size random examples of fit's, data being their inputs and targets (block_size
    tokens each already)."""
    inputs, targets = data
    ix = torch.randint(len(inputs), (batch_size,), generator=generator)
    return inputs[ix].to(device), targets[ix].to(device)


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
    Sized as AdamW's updates are (match_rms_adamw), it shares their learning rate and schedule.
    With LoRA, only what trains."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in trained if name.startswith("h.") and p.dim() == 2]
    # the rest, for AdamW
    params = [p for _, p in trained if all(p is not h for h in hidden)]
    # with LoRA the tables train new rows only: weight decay would move the others
    table_decay = 0.0 if model.lora else args.weight_decay
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": table_decay},
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
    and, under DDP, of every process's batches; returns their mean loss. A batch is what the
    model takes (here inputs and targets), and it returns what it computed and the loss. In
    float16 the scaler scales the loss up, so that small gradients don't round to zero, and back
    down before the step."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, args)
    total = 0.0
    for i, batch in enumerate(batches):
        # DDP averages gradients across processes during backward; do it only on the last batch
        last = i == len(batches) - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast(args, batch[0].device):
                _, loss = model(*batch)
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


def train(model, optimizer, train_data, val_data, args, device, chars_per_token, step, history,
          on_checkpoint):
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
                check_finite(losses["val"], step)
                eval_seconds += time.time() - eval_start
                evaluations += 1
                seconds = time.time() - start
                bpc = losses["val"] / chars_per_token / math.log(2)
                history.append({"step": step, "seconds": round(clock + seconds, 3), **losses,
                                "val_bpc": bpc})
                print(f"step {step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, val {bpc:.3f} bits/char"
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


def save_checkpoint(path, model, optimizer, tokenizer, step, history, rng_states, stage=STAGE,
                    state=None):
    """Everything a run needs to go on where it stopped, as plain tensors, numbers and strings
    (so it loads with weights_only=True), written atomically: a crash mid-write leaves the
    previous checkpoint as it was. A stage built on this one names itself (stage) and keeps what
    it needs of its own in state (stage 10: its reference's digest); None here."""
    checkpoint = {"stage": stage, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "config": asdict(model.config), "tokenizer": tokenizer.identity(), "step": step,
                  "history": history, "rng_states": rng_states, "lora": model.lora,
                  "state": state}
    if model.lora:
        # the adapters and the new rows alone; lora says where the base is, and its digest
        checkpoint["model"] = adapter_state(model)
    try:
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
    except OSError as err:
        raise UserError(f"could not write the checkpoint {path} ({err.strerror or err}); "
                        "the previous one, if any, is intact") from None


def save_merged(path, model, tokenizer, stage=STAGE):
    """A model alone, its adapters folded in, with its config and tokenizer: what --merge writes,
    for this stage or stage 08 to fine-tune or talk to (not to resume), written atomically."""
    checkpoint = {"stage": stage, "model": model.state_dict(), "config": asdict(model.config),
                  "tokenizer": tokenizer.identity()}
    try:
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
    except OSError as err:
        raise UserError(f"could not write the merged model {path} "
                        f"({err.strerror or err})") from None


def read_checkpoint(path, model_only=False, reader=STAGE):
    """A checkpoint of the reader, this stage or one built on it, loaded with weights_only=True:
    only tensors and plain data are rebuilt, so code hidden in a crafted file never runs. With
    model_only, the model that a run of any stage saved, or a merged one alone: something to
    fine-tune or talk to, not to resume."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train one first with --out {path.parent}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                        "it may be truncated or from elsewhere") from None
    stage = checkpoint.get("stage") if isinstance(checkpoint, dict) else None
    if model_only and isinstance(stage, str) and stage < "07":
        raise UserError(f"{path} is a checkpoint of {stage}.py, whose GPT-2 model this stage does "
                        "not load: give --init-from a run of stage 07 or later, or a Llama or "
                        f"Qwen3 model (sample this one with python {stage}.py --sample --out "
                        f"{path.parent})")
    keys = {"stage", "model", "optimizer", "config", "tokenizer", "step", "history", "rng_states",
            "lora", "state"}
    found = set(checkpoint) if isinstance(stage, str) else set()
    if model_only:
        # a model alone, as a merged one is, or with what its run needs to go on
        fits = {"stage", "model", "config", "tokenizer"} <= found <= keys
    else:
        fits = stage == reader and found == keys
    if isinstance(stage, str) and stage != reader and not fits:
        raise UserError(f"{path} is a checkpoint of {stage}.py, not of {reader}.py; "
                        f"sample it with python {stage}.py --sample --out {path.parent}")
    if not fits:
        raise UserError(f"{path} is not a checkpoint written by this version of {reader}.py")
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
    # a run without adapters trained at --lora-rank 0
    lora = checkpoint["lora"] or {"lora_rank": 0}
    flags = {name: value for name, value in lora.items() if name.startswith("lora_")}
    trained = {**checkpoint["config"], "tokenizer": checkpoint["tokenizer"].get("name", "char"),
               **flags}
    for name, value in trained.items():
        if getattr(args, name, None) not in (None, value):
            raise UserError(f"{path} was trained with --{name.replace('_', '-')} {value}, not "
                            f"{getattr(args, name)}; resume with the flags it was trained with")


def stage_folder(source):
    """Whether source is the --out folder of a run of stage 07, 08 or this stage, or a Hugging
    Face model's name or folder."""
    return (Path(source) / "ckpt.pt").is_file()


def load_model(source, block_size=None, dropout=0.0, checkpoint=None):
    """The model, on the CPU, and its chat template, from source: the --out folder of a run of
    stage 07, 08 or this stage (its checkpoint, if already read; adapters come on their base), or
    a Llama or Qwen3 model of Hugging Face's. Its context is block_size, or its own (a Hugging
    Face model's up to 1,024 tokens: a step's memory grows with it). A model of ours grows rows
    for its template's tokens."""
    if not stage_folder(source):
        context = block_size or min(pretrained_context(source), 1024)
        model = GPT.from_pretrained(source, context, dropout)
        return model, HuggingFaceChat(HuggingFaceTokenizer(source))
    path = Path(source) / "ckpt.pt"
    checkpoint = checkpoint or read_checkpoint(path, model_only=True)
    if checkpoint.get("lora"):
        return lora_model(checkpoint, path)
    config = checkpoint["config"]
    if (block_size or 0) > config["block_size"]:
        raise UserError(f"--block-size {block_size} is longer than {source}'s context of "
                        f"{config['block_size']} tokens")
    config = {**config, "block_size": block_size or config["block_size"], "dropout": dropout}
    model = model_from_checkpoint({**checkpoint, "config": config}, path)
    tokenizer = tokenizer_from_identity(checkpoint["tokenizer"])
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return model, HuggingFaceChat(tokenizer)
    template = ChatTemplate(tokenizer)
    return grow_vocabulary(model, template.vocab_size), template


def lora_model(checkpoint, path):
    """The checkpoint's adapters on their base, checked to be the same, and its chat template."""
    lora = checkpoint["lora"]
    config = checkpoint["config"]
    model, template = load_model(lora["base"], config["block_size"], config["dropout"])
    if weights_digest(model) != lora["base_digest"]:
        raise UserError(f"the adapters in {path} were trained on another {lora['base']}: "
                        "its weights have changed")
    add_lora(model, lora)
    trained = adapter_state(model)
    shapes = {name: tensor.shape for name, tensor in checkpoint["model"].items()}
    if shapes != {name: tensor.shape for name, tensor in trained.items()}:
        raise UserError(f"the adapters in {path} don't fit their base; it was altered")
    with torch.no_grad():
        for name, tensor in trained.items():
            tensor.copy_(checkpoint["model"][name])
    return model, template


def check_lora_flags(argv, args):
    """--lora-alpha, --lora-dropout and --lora-targets shape the adapters: with --lora-rank 0
    there are none, and they would do nothing without a word."""
    for flag in ("--lora-alpha", "--lora-dropout", "--lora-targets"):
        if not args.lora_rank and given(argv, flag):
            raise UserError(f"{flag} shapes adapters, and --lora-rank 0 trains without them: give "
                            f"a --lora-rank above 0, or leave {flag} out")


def lora_settings(args, model):
    """The flags' LoRA settings, and what finds and checks the base, model; the rows it has not
    learned yet train too (a chat template's tokens on a model of stage 07)."""
    targets = [name for name in TARGETS if name in args.lora_targets]
    return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout, "lora_targets": targets,
            "first_new_row": model.first_new_row, "base": args.init_from or BASE,
            "base_digest": weights_digest(model)}


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
             use_cache=True, stop=None):
    """Extend each row of idx, a (B, T) tensor of token ids, by max_new_tokens tokens. The model
    reads, at every position, that position and the block_size - 1 before it: a window moving on
    with each token. With the KV cache each step feeds only the newest token, and keys that leave
    the window are dropped, never computed again. Both ways give the same tokens. With stop, a
    row that has made that token makes only it from then on, until every row has."""
    was_training = model.training
    model.eval()
    cache = None
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    # a bar once sampling takes more than 5 s
    for _ in tqdm(range(max_new_tokens), "sampling", leave=False, delay=5):
        if use_cache and cache is not None:
            logits, _ = model(idx[:, -1:], cache=cache)  # (B, 1, vocab_size)
        else:
            cache = KVCache(model.block_size, len(model.h)) if use_cache else None
            logits, _ = model(idx, cache=cache)  # (B, T, vocab_size)
        idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
        if stop is not None:
            idx_next = idx_next.masked_fill(done, stop)
            done |= idx_next == stop
        idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        if done.all():
            break
    model.train(was_training)
    return idx


@torch.no_grad()
def stream(model, new_ids, cache, stop, args):
    """A reply's tokens, each as soon as it is made, after new_ids (the tokens that the cache has
    not seen yet) go in; until stop or --max-new-tokens. The last token is not fed in."""
    tokens = torch.tensor([new_ids], device=model.lm_head.weight.device)
    for _ in range(args.max_new_tokens):
        logits, _ = model(tokens, cache=cache)
        tokens = sample_next(logits[:, -1, :], args.temperature, args.top_k, args.top_p)
        yield tokens.item()
        if tokens.item() == stop:
            return


def chat(model, template, args, keep_conversation=True):
    """--chat: a message a line (from a terminal or a pipe), each reply printed as it is made.
    The conversation is kept, and so is the KV cache: a turn feeds in only the tokens it has not
    seen, and the oldest leave the window as in generate. Without keep_conversation each message
    is answered on its own, as a task's questions are (stage 11's)."""
    print("Talk to the model, a message a line; Ctrl-C stops a reply; Ctrl-C or Ctrl-D at the "
          "prompt, or /quit, leaves.")
    messages, fed, cache = [], [], None
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not sys.stdin.isatty():
            # from a pipe: the message, as a terminal would have shown it
            print(text)
        if text.strip() == "/quit":
            return
        if not keep_conversation:
            messages = []
        messages.append({"role": "user", "content": text})
        ids, _ = template.render(messages, reply_next=True)
        if cache is None or ids[:len(fed)] != fed:
            # the first turn, a reply cut short, or a template that renders the past anew
            cache, fed = KVCache(model.block_size, len(model.h)), []
        reply, shown = [], ""
        try:
            for token in stream(model, ids[len(fed):], cache, template.end, args):
                reply.append(token)
                text = template.decode(reply)
                # a token can end inside a character of several bytes: print it once whole
                if not text.endswith("\ufffd"):
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        except KeyboardInterrupt:
            # a step cut short may have left the cache updated in some layers only
            cache = None
        print()
        fed = ids + reply[:-1]
        messages.append({"role": "assistant", "content": template.decode(reply)})


# %% [markdown]
# ## Run it
# From a terminal, run this file with python; its flags change the hyperparameters (`--help`
# lists them). In a notebook, edit the hyperparameters cell above, its values or
# notebook_flags, and run all the cells again.

# %% Train, then sample
def add_flags(parser):
    # unlike stages 01-05, always keep the checkpoint
    parser.set_defaults(out=f"runs/{STAGE}")
    parser.add_argument("--init-from", type=nonempty("a model"), metavar="NAME|DIR",
                        help="fine-tune the --out folder of a run of stage 07 or of this stage, "
                        "or a Llama or Qwen3 model: a Hugging Face hub name or a save_pretrained "
                        f"folder (needs transformers) (default: {BASE}, made first if missing)")
    parser.add_argument("--block-size", type=checked("block_size", int), metavar="INT",
                        help="context length: the most tokens the model looks back over "
                        "(default: the model's own, up to 1,024)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="autocast precision for training; "
                        "auto: bfloat16 where the hardware has it")
    parser.add_argument("--resume", action="store_true",
                        help="go on training from the checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="let a new run replace the checkpoint already in --out")
    parser.add_argument("--sample", action="store_true",
                        help="only reply to --prompt, with the model in --out or --init-from")
    parser.add_argument("--chat", action="store_true",
                        help="talk to the model in --out or --init-from")
    parser.add_argument("--prompt", type=nonempty("some text"),
                        help="a user's message, for --sample to reply to")
    parser.add_argument("--num-samples", type=checked("num_samples", int), default=1,
                        help="samples per sampler")
    parser.add_argument("--temperature", type=checked("temperature", float), default=1.0,
                        help="0: greedy")
    parser.add_argument("--top-k", type=checked("top_k", int),
                        help="sample from the k likeliest tokens")
    parser.add_argument("--top-p", type=checked("top_p", float),
                        help="sample from the nucleus of mass p")
    parser.add_argument("--lora-rank", type=checked("lora_rank", int), default=8, metavar="INT",
                        help="the adapters' rank r; 0: every weight trains (stage 08)")
    parser.add_argument("--lora-alpha", type=checked("lora_alpha", float), default=16.0,
                        metavar="FLOAT", help="updates scaled by alpha / r")
    parser.add_argument("--lora-targets", nargs="+", choices=TARGETS, default=TARGETS,
                        metavar="NAME", help="a block's matrices that get adapters")
    parser.add_argument("--lora-dropout", type=checked("lora_dropout", float), default=0.0,
                        metavar="FLOAT", help="dropout on the adapters' input")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapters in --out into their weights, in --out/merged")


DATA_HELP = ("fine-tune on the conversations of this JSONL file, one a line as "
             '{"messages": [{"role": ..., "content": ...}, ...]}, instead of Tiny Shakespeare\'s')


def parse_flags(argv):
    """The flags, over the defaults of the recipe for the model they fine-tune: `chat` for a run
    of ours, `finetune` for a Hugging Face model. Adapters, few and from zero, take 4x its
    learning rate (of 1x to 8x, 4x learned most here)."""
    args = parse_args(argv, STAGE, __doc__, RECIPES["chat"], add_flags, has_attention=True,
                      data_help=DATA_HELP)
    hugging_face = args.init_from and not stage_folder(args.init_from)
    recipe = RECIPES["finetune" if hugging_face else "chat"]
    if args.lora_rank:
        recipe = {**recipe, "lr": 4 * recipe["lr"]}
    args = parse_args(argv, STAGE, __doc__, recipe, add_flags, has_attention=True,
                      data_help=DATA_HELP)
    check_lora_flags(argv, args)
    return args


def checkpoint_path(args):
    return Path(args.out) / "ckpt.pt"


def starting_checkpoint(args, stage=STAGE):
    """With --resume, the checkpoint of stage to go on from, if it has steps left to train; for a
    new run None, once it is clear that no trained model will be replaced without --overwrite."""
    # no other run may train into --out while this one does
    hold_out(args.out)
    path = checkpoint_path(args)
    if args.resume:
        checkpoint = read_checkpoint(path, reader=stage)
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


def sample_only(args, device, keep_conversation=True):
    """--sample: --num-samples replies to --prompt, a user's message; --chat: a conversation (or,
    without keep_conversation, messages each answered on its own). With the model in --out, or of
    --init-from."""
    model, template = load_model(args.init_from or args.out, args.block_size)
    model.eval().to(device)
    if args.chat:
        # a Ctrl-C in the chat ends a reply, or the chat at its prompt: not a run cut short, so
        # run() is not told of it, and the exit status stays 0
        signal.signal(signal.SIGINT, signal.default_int_handler)
        chat(model, template, args, keep_conversation)
        return
    if not args.prompt:
        raise UserError("--sample replies to a message: give it with --prompt, or talk with --chat")
    prompt, _ = template.render([{"role": "user", "content": args.prompt}], reply_next=True)
    if args.init_from:
        check_token_ids([prompt], model.config.vocab_size, args.init_from)
    if args.plot_attention:
        report.plot_attention(model, template, torch.tensor(prompt), args.out)
    sampler = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print_samples(model, template, prompt, args, device, {"reply": sampler})


def merge_only(args, stage=STAGE):
    """--merge: the model in --out (of a run of this stage or of one built on it), its adapters
    folded in, into --out/merged: a model alone, which stage writes, and of a Hugging Face model a
    save_pretrained folder."""
    path = checkpoint_path(args)
    checkpoint = read_checkpoint(path, model_only=True)
    if not checkpoint.get("lora"):
        raise UserError(f"{path} has no adapters to merge (--lora-rank 0)")
    out = Path(args.out) / "merged"
    if (out / "ckpt.pt").exists() and not args.overwrite:
        raise UserError(f"{out} holds a merged model already; replace it with --overwrite")
    model, template = lora_model(checkpoint, path)
    merged = merge(model)
    save_merged(out / "ckpt.pt", merged, template, stage)
    if isinstance(template, HuggingFaceChat):
        weights = {hugging_face_name(name): p for name, p in merged.named_parameters()}
        export_pretrained(checkpoint["lora"]["base"], weights, template.tokenizer, out)
    print(f"merged into {out}; talk to it with python {stage}.py --chat --out {out}")


def make_base(base=BASE, command=(BASE_SCRIPT,)):
    """The model in base, made by python command (a stage's script, and its flags) as a process
    of its own: the model that fine-tuning starts from without --init-from, to the last bit the
    one that command makes. By default the default run of BASE_SCRIPT, into BASE. What that run
    prints goes to base/made.log; here, only that a model is being made (it may make its own
    base first) and, once it is, its last evaluation."""
    line = " ".join(command)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(f"{base} holds no model yet: make it first with python {line}")
    log = Path(base) / "made.log"
    print(f"{base} holds no model yet: making it first with python {line} (what it prints: "
          f"{log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    # a Ctrl-C reaches that process too, which saves its run and stops: wait for it
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(log, "w") as f:
            process = subprocess.Popen([sys.executable, str(ROOT / command[0]), *command[1:]],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for output in process.stdout:
                f.write(output)
                if "holds no model yet" in output:
                    print(f"  {output}", end="", flush=True)
                if output.startswith("step ") and "val loss" in output:
                    last = output.split(" | ")[0]
            status = process.wait()
    finally:
        signal.signal(signal.SIGINT, handler)
    if status:
        raise UserError(f"python {command[0]} stopped before it finished (status {status}, see "
                        f"{log}); finish it with python {line} --resume, then run this again")
    print(f"  made {base}: {last}", flush=True)


def make_model(args, checkpoint, device, rows_per_example=1):
    """The model to fine-tune, on the device, and its chat template: the checkpoint's when
    resuming; else --init-from's, or without it stage 07's default run (made first if it is
    missing). Checked first to fit in the device's memory, a step being --batch-size examples of
    rows_per_example sequences each (a preference pair is two)."""
    if checkpoint:
        check_resumable(checkpoint, args, checkpoint_path(args))
        model, template = load_model(args.out, args.block_size, args.dropout, checkpoint)
    else:
        if not args.init_from and not stage_folder(BASE):
            make_base()
        model, template = load_model(args.init_from or BASE, args.block_size, args.dropout)
        if model.lora:
            raise UserError(f"{args.init_from} holds adapters, not a model: fold them in with "
                            f"python {STAGE}.py --merge --out {args.init_from}, then --init-from "
                            f"{Path(args.init_from) / 'merged'}")
        if args.lora_rank:
            add_lora(model, lora_settings(args, model))
    # the context fine-tuning takes: the model's own, without --block-size
    args.block_size = model.block_size
    check_memory(model, args, device, rows_per_example * args.batch_size)
    return model.to(device), template


def describe(model, tokenizer, args, device, rows_per_example=1):
    """Print what is trained, where, and on how many tokens a step (of --batch-size examples,
    rows_per_example sequences each); return the parameter count."""
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters (every weight and bias; a tied head counted once), "
          f"{tokenizer.vocab_size} tokens, on {device} in {args.dtype}; weights "
          f"{args.init_from or BASE}")
    if model.lora:
        trained = sum(t.numel() for t in adapter_state(model).values())
        print(f"{trained:,} of them trained ({trained / n_params:.2%}): the adapters of rank "
              f"{model.lora['lora_rank']}, and any new tokens' rows")
    rows = rows_per_example * args.batch_size
    tokens_per_step = rows * args.block_size * args.grad_accum_steps * args.world_size
    print(f"{rows} x {args.block_size} tokens x {args.grad_accum_steps} accumulation "
          f"x {args.world_size} process(es) = {tokens_per_step:,} tokens per step")
    return n_params


def train_everywhere(model, optimizer, tokenizer, train_data, val_data, args, device, rank,
                     step, history):
    """train() in every process, DDP keeping their models the same, with checkpoints written by
    rank 0; then the processes leave together. Returns what train() returns."""
    # characters a token of the val replies (1 for characters)
    chars_per_token = characters_per_token(tokenizer, val_data[1][val_data[1] >= 0])

    def on_checkpoint(step, history):
        # every process takes part
        states = rng_states()
        path = checkpoint_path(args)
        if rank == 0:
            save_checkpoint(path, model, optimizer, tokenizer, step, history, states)
        return path

    ddp_model = DDP(model) if args.world_size > 1 else model
    result = train(ddp_model, optimizer, train_data, val_data, args, device, chars_per_token,
                   step, history, on_checkpoint)
    del ddp_model
    if dist.is_initialized():
        # DDP keeps the process group in reference cycles: freed at exit instead, it can abort
        gc.collect()
        # leave together: a process gone early can abort the others' teardown
        dist.barrier()
        dist.destroy_process_group()
    return result


def overfitting(history):
    """A line that says so if the val loss ended above its best, '' if not."""
    best = min(history, key=lambda h: h["val"])
    if history[-1]["val"] <= best["val"]:
        return ""
    earlier = (f"--max-iters {best['step']} stops earlier" if best["step"] else
               "fewer steps, a smaller --lr or more data do better")
    return (f"the val loss rose after step {best['step']} ({best['val']:.4f} -> "
            f"{history[-1]['val']:.4f}): the model learned its train replies by heart; the "
            f"checkpoint is the last step's ({earlier})\n")


def ended_its_turn(reply, template):
    """Whether a reply's first special token is its end of turn: it stopped there, with no turn of
    another speaker begun before it (which the printed text, markers left out, would hide)."""
    special = [token for token in reply if token in template.special]
    return bool(special) and special[0] == template.end


def print_samples(model, template, prompt, args, device, samplers):
    """args.num_samples replies from each sampler, each to its end of turn (or --max-new-tokens),
    --batch-size at a time so that any number fits. Returns how many ended their turn."""
    ended = 0
    for label, settings in samplers.items():
        for first in range(0, args.num_samples, args.batch_size):
            rows = min(args.batch_size, args.num_samples - first)
            context = torch.tensor([prompt] * rows, device=device)
            rows = generate(model, context, args.max_new_tokens, stop=template.end, **settings)
            for row in rows[:, len(prompt):].tolist():
                print(f"{'-' * 30} {label} {'-' * (49 - len(label))}")
                print(template.decode(row))
                ended += ended_its_turn(row, template)
    return ended


def demo(model, template, conversations, args, device):
    """The model's replies to the first val conversations whose first reply fits in the context
    (as fine-tuning keeps them), next to the real replies; and how many of the model's ended their
    turn within --max-new-tokens."""
    ended, shown = 0, []
    for messages in conversations:
        reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if len(template.render(messages[:reply + 1])[0]) <= args.block_size + 1:
            shown.append((messages[:reply], messages[reply]["content"]))
    for prompt, real in shown[:3]:
        for message in prompt:
            print(f"{message['role']}: {message['content']}")
        print(f"{'-' * 30} real reply {'-' * 39}")
        print(real)
        prompt, _ = template.render(prompt, reply_next=True)
        sampler = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        ended += print_samples(model, template, prompt, args, device, {"the model's": sampler})
        print()
    replies = len(shown[:3]) * args.num_samples
    print(f"{ended} of {replies} {'reply' if replies == 1 else 'replies'} ended the turn within "
          f"--max-new-tokens {args.max_new_tokens}: stopped at the end-of-turn token, no turn of "
          "another speaker begun before it")


def main(argv=None):
    args = parse_flags(argv)
    rank, world_size, device = start_processes(args)
    if args.sample or args.chat:
        sample_only(args, device)
        return
    if args.merge:
        merge_only(args)
        return

    checkpoint = starting_checkpoint(args)
    # read first, so that a bad line is found before any model is loaded
    train_conversations, val_conversations = load_conversations(args.data)
    model, template = make_model(args, checkpoint, device)
    train_data, val_data = fine_tuning_data(args, template, train_conversations,
                                            val_conversations)
    check_token_ids([train_data[0], val_data[0]], model.config.vocab_size,
                    args.init_from or checkpoint_path(args))
    print("fine-tuning on conversations: the losses are on the replies alone (their text and "
          "end-of-turn tokens), bits/char per character of their text")
    optimizer = configure_optimizer(model, args)
    step, history = 0, []
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history = checkpoint["step"], checkpoint["history"]
        set_rng_state(checkpoint["rng_states"], rank, world_size)
        print(f"resuming from step {step} of {checkpoint_path(args)}")
    n_params = describe(model, template, args, device)

    history, tokens_per_second, stopped_by = train_everywhere(
        model, optimizer, template, train_data, val_data, args, device, rank, step, history)
    if rank > 0:
        return
    if history:
        path = report.save_metrics(args.out, {
            "stage": STAGE, "config": vars(args), "parameters": n_params,
            "tokenizer": template.identity(), "vocab_size": template.vocab_size,
            "device": str(device), "history": history, "tokens_per_second": tokens_per_second,
            "train_loss": history[-1]["train"], "val_loss": history[-1]["val"],
            "val_bpc": history[-1]["val_bpc"]})
        print(f"metrics written to {path}")
        print(overfitting(history), end="")
    if stopped_by == signal.SIGTERM:
        # the job is being stopped: no demo; run() exits with status 143
        return stopped_by
    if args.plot_attention:
        # the first val conversation's first tokens
        report.plot_attention(model, template, val_data[0][0, :32], args.out)

    demo(model, template, val_conversations, args, device)
    print(f"the model is in {checkpoint_path(args)}; talk to it with python {STAGE}.py --chat "
          f"--out {args.out}")
    # a run Ctrl-C cut short exits with status 130, after its demo
    return stopped_by


if __name__ == "__main__":
    run(main, notebook_flags)
