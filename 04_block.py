# %% [markdown]
"""04_block.py: the transformer block, stacked n_layer deep.

New here: an MLP after attention in each block (Linear, ReLU, Linear, 4x wider inside), so each
position can compute on what it gathered; residual connections (x + f(x)) and pre-norm
LayerNorm, which keep a deep stack trainable; dropout (off by default: in this short run --dropout
0.1 ended at val loss 1.92, not 1.85; it helps once a model can overfit); a final LayerNorm.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: val loss 1.85 after 3000 steps (no blocks: 2.23), in 40 s; a sample with names and verse.
"""
# %%
import math
import time

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from shared import UserError, duration, report
from shared.cli import parse_args, run
from shared.data import get_batch, load_dataset
from shared.device import build_model, select_device

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "04_block"


# %% Hyperparameters: the flags' defaults (batch_size is --batch-size); edit them in a notebook
# In a notebook this list is the command line: any flag, e.g. ["--data", "poems.txt"]
notebook_flags = []
hyperparameters = dict(
    batch_size=32,
    block_size=32,
    max_iters=3000,
    eval_interval=500,
    eval_iters=100,
    lr=3e-3,
    n_embd=64,
    n_head=4,
    n_layer=2,
    dropout=0.0,
)


# %% The model

class Head(nn.Module):
    """One head of causal self-attention."""

    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # ones on and below the diagonal: position t may look at positions 0..t, never ahead
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def attention_weights(self, x):
        T = x.size(1)
        q = self.query(x)  # (B, T, head_size): what each position is looking for
        k = self.key(x)  # (B, T, head_size): what each position offers
        # scaled by head_size**-0.5 so the scores keep unit variance and softmax doesn't saturate
        scores = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5  # (B, T, T)
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        # (B, T, T): row t says how much position t takes from each position
        return F.softmax(scores, dim=-1)

    def forward(self, x):
        v = self.value(x)  # (B, T, head_size): what each position hands over
        return self.dropout(self.attention_weights(x)) @ v  # (B, T, head_size)


class MultiHeadAttention(nn.Module):
    """n_head heads in parallel; a projection mixes their concatenated outputs."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        head_size = n_embd // n_head
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout)
                                    for _ in range(n_head)])
        self.c_proj = nn.Linear(n_embd, n_embd)  # output projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, n_embd)
        return self.dropout(self.c_proj(x))


class MLP(nn.Module):
    """The same small network applied at every position: attention gathers, the MLP computes."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.relu = nn.ReLU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.relu(self.c_fc(x))))


class Block(nn.Module):
    """Attention then an MLP, each reading a LayerNorm of x (pre-norm) and adding onto x."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = MultiHeadAttention(n_embd, n_head, block_size, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x):
        # the residual path x + ... carries the gradient straight down, so deep stacks still train
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, vocab_size, block_size, n_embd, n_head, n_layer, dropout):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)  # token embeddings
        self.wpe = nn.Embedding(block_size, n_embd)  # position embeddings
        blocks = [Block(n_embd, n_head, block_size, dropout) for _ in range(n_layer)]
        self.h = nn.Sequential(*blocks)
        self.ln_f = nn.LayerNorm(n_embd)  # final LayerNorm
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # small weights give every token about the same probability at first: loss ~ ln(vocab_size)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        # idx and targets: (B, T) token ids
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))  # (B, T, n_embd)
        x = self.ln_f(self.h(x))  # (B, T, n_embd)
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


def train(model, train_data, val_data, args, device, chars_per_token):
    """AdamW on random batches, with loss estimates (and bits per character, which compares
    tokenizers) every eval_interval steps and a progress line at least every few seconds. Ctrl-C
    stops early and keeps what the model has learned."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
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
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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

@torch.no_grad()
def generate(model, idx, max_new_tokens):
    """Extend each row of idx, a (B, T) tensor of token ids, by max_new_tokens tokens, drawing
    each from the model's predicted distribution. Only the last block_size tokens are fed back,
    so a sample can be longer than the context the model was trained on."""
    was_training = model.training
    model.eval()
    # a bar once sampling takes more than 5 s
    for _ in tqdm(range(max_new_tokens), "sampling", leave=False, delay=5):
        logits, _ = model(idx[:, -model.block_size:])  # (B, T, vocab_size)
        # the next token's distribution, (B, vocab_size)
        probs = F.softmax(logits[:, -1, :], dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
    model.train(was_training)
    return idx


# %% [markdown]
# ## Run it
# From a terminal, run this file with python; its flags change the hyperparameters (`--help`
# lists them). In a notebook, edit the hyperparameters cell above, its values or
# notebook_flags, and run all the cells again.

# %% Train, then sample
def main(argv=None):
    args = parse_args(argv, STAGE, __doc__, hyperparameters, has_attention=True)
    torch.manual_seed(args.seed)
    device = select_device(args.device)
    tokenizer, train_data, val_data = load_dataset(args.data, args.block_size)
    model = build_model(
        lambda: GPT(tokenizer.vocab_size, args.block_size, args.n_embd, args.n_head, args.n_layer,
                    args.dropout),
        args, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters (every weight and bias), {tokenizer.vocab_size} tokens, "
          f"on {device}")
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
    print("-" * 80)
    print(tokenizer.decode(generate(model, context, args.max_new_tokens)[0].tolist()))


if __name__ == "__main__":
    run(main, notebook_flags)
