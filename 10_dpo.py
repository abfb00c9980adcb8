# %% [markdown]
"""10_dpo.py: teach the assistant what to prefer: direct preference optimization (DPO).

New here, in what a batch is and what it costs: a prompt, a reply preferred and one not (trl's
preference format), and a loss that raises the first against the second relative to a reference
model, -log sigmoid(beta ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log
p_ref(rejected)))) (Rafailov et al. 2023): no reward model, no sampling while training. The
reference is a frozen copy of the model DPO starts from or, with adapters (--lora-rank 8), the
model itself with its adapters off: no second copy, what a large model needs. DPO alone pushes
log-probability ratios, not language: the chosen reply gains on the rejected one as well when
both fall, and the model drifts from words. So by default the chosen replies' own loss is added
(--sft-weight 1, RPO; trl's loss_type sft), which keeps them likely. Logged as trl logs it: the
loss, the rewards of chosen and rejected, their margin and how often it is positive. With no
--data, the pairs are made from the model's own replies to Tiny Shakespeare's short prompts: one
that ended its turn in the context is preferred to one that ran on past it, a property a program
checks in the model's replies before DPO and after, beside whether they are still words.

This stage builds on stage 09 and imports it: the model and its adapters, loading a chat model,
checkpoints and exact resume, Ctrl-C and torchrun, the training step, the samplers and the chat
are 09's; what this file holds is DPO's. It starts from the model stage 08 writes by default
(runs/08_chat, made first if it is not there), or --init-from a run of stage 08, a merged one of
09, or a Llama or Qwen3 chat model.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: 90 steps of DPO on stage 08's model, every weight trained: the chosen reply ahead in 95%
of val pairs (margin 0.90); of 576 replies to val prompts, 77 ended their turn in the context
before DPO, 514 after, and 84% of their runs of letters were words before, 79% after; the loss on
real val replies 1.7471 -> 1.7826 (--sft-weight 0: 390 ended, 41% words, 2.7906); 24 s on a
2-core CPU. Checkpoint in runs/10_dpo/.
Then talk to it:
    python 10_dpo.py --chat
"""
# %%
import argparse
import copy
import gc
import importlib
import json
import re
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from shared import UserError, atomic_write, report
from shared.cli import checked, nonempty, parse_args, run
from shared.conversations import load_conversations, load_preferences, read_preferences
from shared.data import check_token_ids, read_text
from shared.device import all_reduce
from shared.hub import weights_digest

# Stage 09, which this stage builds on: a file name that starts with a digit can't follow
# `import`, so importlib loads it. What this stage takes from it, by name:
stage09 = importlib.import_module("09_lora")
# a chat model to start from, with adapters (that switch off) or without
make_base = stage09.make_base
check_lora_flags = stage09.check_lora_flags
make_model = stage09.make_model
load_model = stage09.load_model
stage_folder = stage09.stage_folder
adapters_off = stage09.adapters_off
# processes, checkpoints and exact resume
start_processes = stage09.start_processes
checkpoint_path = stage09.checkpoint_path
trained_at = stage09.trained_at
starting_checkpoint = stage09.starting_checkpoint
save_checkpoint = stage09.save_checkpoint
rng_states = stage09.rng_states
set_rng_state = stage09.set_rng_state
# training: the optimizer, a step on any loss, Ctrl-C, the progress line
configure_optimizer = stage09.configure_optimizer
train_step = stage09.train_step
autocast = stage09.autocast
StopOnSignal = stage09.StopOnSignal
progress = stage09.progress
check_finite = stage09.check_finite
describe = stage09.describe
overfitting = stage09.overfitting
# conversations as examples, as fine-tuning learns them
fit = stage09.fit
# sampling, the chat and merging
generate = stage09.generate
ended_its_turn = stage09.ended_its_turn
print_samples = stage09.print_samples
sample_only = stage09.sample_only
merge_only = stage09.merge_only

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "10_dpo"
# without --init-from, DPO starts from the default run of stage 08, made first if missing
BASE_SCRIPT = "08_chat.py"
BASE = "runs/08_chat"
# the model's replies to each prompt, of which the default pairs are made
SAMPLES = 16


# %% Hyperparameters: the flags' defaults (batch_size is --batch-size); edit them in a notebook
# In a notebook this list is the command line: any flag, e.g. ["--data", "prefs.jsonl"]
notebook_flags = []
# Recipes: `dpo` for a model of ours (a batch is 16 pairs), `finetune` for a Hugging Face model:
# a small learning rate, so that it adapts, not forgets.
RECIPES = {
    "dpo": dict(batch_size=16, max_iters=90, eval_interval=30, eval_iters=4, lr=5e-4,
                warmup_iters=5, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1,
                dropout=0.0),
    "finetune": dict(batch_size=8, max_iters=200, eval_interval=50, eval_iters=20, lr=3e-5,
                     warmup_iters=10, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1,
                     dropout=0.0),
}


# %% DPO's loss

def sequence_logps(model, x, y):
    """Each row's log-probability of its learned tokens (targets other than -1), summed: log p(reply
    | prompt), in float32."""
    logits, _ = model(x)
    logps = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    taken = logps.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (taken * (y != -1)).sum(dim=-1)


class DPO(nn.Module):
    """DPO's loss on a batch of pairs (chosen rows, then rejected ones): each reply's reward is beta
    times how much likelier the policy makes it than the reference does, beta (log p(reply) - log
    p_ref(reply)), and the loss is -log sigmoid(reward of chosen - reward of rejected), the mean
    over the pairs. With it, what trl logs: the rewards' means, their margin, how often the chosen
    one is ahead, and the policy's loss per token of the chosen replies (how far it moved from
    what fine-tuning taught). The reference is the policy with its adapters off under LoRA
    (reference None), else a frozen copy of the model DPO started from. Called as stage 09's
    model is, on inputs and targets, it returns what it computed (those statistics) and the
    loss."""

    def __init__(self, policy, reference, beta, sft_weight):
        super().__init__()
        self.policy = policy
        self.reference = reference
        self.beta = beta
        self.sft_weight = sft_weight
        # what a resumed run checks its reference against
        self.reference_digest = None if reference is None else weights_digest(reference)

    def train(self, mode=True):
        """Train or evaluate the policy; a reference copy stays in eval mode, with no dropout."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def forward(self, x, y):
        logps = sequence_logps(self.policy, x, y)
        with torch.no_grad():
            if self.reference is None:
                with adapters_off(self.policy):
                    reference_logps = sequence_logps(self.policy, x, y)
            else:
                reference_logps = sequence_logps(self.reference, x, y)
        chosen, rejected = (self.beta * (logps - reference_logps)).chunk(2)
        chosen_tokens = (y.chunk(2)[0] != -1).sum().clamp(min=1)
        chosen_loss = -logps.chunk(2)[0].sum() / chosen_tokens
        loss = -F.logsigmoid(chosen - rejected).mean() + self.sft_weight * chosen_loss
        statistics = {"chosen": chosen.mean(), "rejected": rejected.mean(),
                      "margin": (chosen - rejected).mean(),
                      "accuracy": (chosen > rejected).float().mean(), "chosen_loss": chosen_loss}
        return statistics, loss


def make_reference(args, model, checkpoint, device):
    """DPO's reference: None under LoRA, where it is the model with its adapters off; else a frozen
    copy of the model DPO starts from, which a resumed run loads again and checks to be the one
    it started from."""
    if model.lora:
        return None
    if not checkpoint:
        return copy.deepcopy(model).requires_grad_(False).eval()
    reference, _ = load_model(args.init_from, args.block_size)
    if weights_digest(reference) != checkpoint["state"]["reference"]:
        raise UserError(f"{args.init_from} has changed since this run started from it; resume "
                        "with the model it started from, DPO's reference")
    return reference.requires_grad_(False).eval().to(device)


# %% Preference pairs

def fit_pairs(template, pairs, block_size):
    """Preference pairs as examples of block_size + 1 tokens (inputs all but the last, targets
    all but the first), chosen then rejected: the prompt and one reply, learned on the reply and
    its end token only (stage 08's mask), cut where the context ends (a reply cut there learns no
    end) and padded. A pair whose prompt leaves no room for a reply is dropped. Returns the inputs
    and targets (-1 where nothing is learned) of shape (pairs, 2, block_size), and how many
    replies were cut and pairs dropped."""
    rows, cut, dropped = [], 0, 0
    for pair in pairs:
        prompt, replies = rendered(template, pair)
        # a reply's first token is the target after the prompt's last
        if len(prompt) > block_size:
            dropped += 1
            continue
        both = []
        for ids, learned in replies:
            cut += len(ids) > block_size + 1
            padding = max(0, block_size + 1 - len(ids))
            both.append((ids[:block_size + 1] + [template.end] * padding,
                         learned[:block_size + 1] + [False] * padding))
        rows.append(both)
    ids = torch.tensor([[r for r, _ in both] for both in rows], dtype=torch.long)
    learned = torch.tensor([[m for _, m in both] for both in rows], dtype=torch.bool)
    ids = ids.view(-1, 2, block_size + 1)
    learned = learned.view(-1, 2, block_size + 1)
    targets = ids[..., 1:].masked_fill(~learned[..., 1:], -1)
    return (ids[..., :-1], targets), cut, dropped


def rendered(template, pair):
    """The pair's prompt, and the prompt with each of its replies, chosen then rejected, as the
    template renders them (token ids and what is learned); a character the model has no token for
    is refused naming the pair's line, for pairs read from a file."""
    try:
        prompt, _ = template.render(pair["prompt"], reply_next=True)
        replies = [template.render([*pair["prompt"], {"role": "assistant", "content": reply}])
                   for reply in (pair["chosen"], pair["rejected"])]
    except UserError as err:
        if "line" not in pair:
            raise
        raise UserError(f"the preference pair of line {pair['line']}: {err}") from None
    return prompt, replies


def preference_data(args, template, train, val):
    """fit_pairs' examples of the train and val pairs, with what was cut or dropped said."""
    splits = []
    for name, part in (("train", train), ("val", val)):
        data, cut, dropped = fit_pairs(template, part, args.block_size)
        plural = "" if len(part) == 1 else "s"
        print(f"{name}: {len(part):,} pair{plural}; in {args.block_size} tokens, {cut:,} "
              f"replies cut where the context ends (they learn no end token), {dropped:,} pairs "
              "dropped (their prompt fills it)")
        if name == "val" and len(part) < 10:
            print(f"  {len(part)} val pair{plural} alone: the val loss, margin and accuracy say "
                  "little, and a few train pairs are soon learned by heart; give more pairs, a "
                  "tenth of which are kept for val")
        if not len(data[0]):
            raise UserError(f"no {name} pair has a prompt that leaves room for a reply in "
                            f"--block-size {args.block_size} tokens; give a longer one")
        splits.append(data)
    return splits


def get_batch(data, batch_size, block_size, device, generator=None):
    """batch_size random pairs of fit_pairs', data being their inputs and targets: the chosen rows,
    then the rejected ones (2 batch_size rows of block_size tokens)."""
    inputs, targets = data
    ix = torch.randint(len(inputs), (batch_size,), generator=generator)
    x = inputs[ix].transpose(0, 1).reshape(-1, inputs.size(-1))
    y = targets[ix].transpose(0, 1).reshape(-1, targets.size(-1))
    return x.to(device), y.to(device)


@torch.no_grad()
def sample_replies(model, template, starts, args, device):
    """The model's continuation of each start (token ids), sampled at temperature 1 from the run's
    seed (every process the same, its own random state left as it was), to its end token or until
    the room the context leaves is full. A batch for each length of start."""
    replies = [None] * len(starts)
    by_length = {}
    for i, start in enumerate(starts):
        by_length.setdefault(len(start), []).append(i)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        for length, indices in tqdm(by_length.items(), "sampling", leave=False, delay=5):
            context = torch.tensor([starts[i] for i in indices], device=device)
            rows = generate(model, context, args.block_size + 1 - length, stop=template.end)
            for i, row in zip(indices, rows[:, length:].tolist(), strict=True):
                ended = template.end in row
                replies[i] = row[:row.index(template.end) + 1] if ended else row
    return replies


def shakespeare_preferences(model, template, args, device):
    """The default pairs, made from Tiny Shakespeare's dialogue and the model's own replies: for
    the first user turn of each conversation that leaves half the context for a reply, SAMPLES
    replies of the model's (sample_replies); each that ended its turn in the context is preferred
    to one that ran on past it, a property a program checks (ended_its_turn). Made once, with the
    model DPO starts from, and kept in --out (preferences.train.jsonl and preferences.val.jsonl,
    trl's format), where a resumed run reads them back."""
    paths = [Path(args.out) / f"preferences.{name}.jsonl" for name in ("train", "val")]
    if args.resume:
        return [read_preferences(path) for path in paths]
    splits = []
    for conversations, path in zip(load_conversations(), paths, strict=True):
        prompts = []
        for messages in conversations:
            reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            if len(template.render(messages[:reply], reply_next=True)[0]) <= args.block_size // 2:
                prompts.append(messages[:reply])
        print(f"sampling {SAMPLES} replies of the model's to each of {len(prompts)} prompts")
        starts = [template.render(prompt, reply_next=True)[0] for prompt in prompts]
        replies = sample_replies(model, template, starts * SAMPLES, args, device)
        pairs = []
        for i, prompt in enumerate(prompts):
            own = replies[i::len(prompts)]
            ended = [reply for reply in own if ended_its_turn(reply, template)]
            # not those that wrote another speaker's turn, then ended: their text alone would end
            ran_on = [reply for reply in own if template.end not in reply]
            # as many pairs as the fewer kind has
            for chosen, rejected in zip(ended, ran_on, strict=False):
                pairs.append({"prompt": prompt, "chosen": template.decode(chosen),
                              "rejected": template.decode(rejected)})
        if not dist.is_initialized() or dist.get_rank() == 0:
            lines = [json.dumps({"prompt": pair["prompt"],
                                 "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": pair["rejected"]}]})
                     for pair in pairs]
            with atomic_write(path, "w") as f:
                f.write("".join(line + "\n" for line in lines))
        splits.append(pairs)
    return splits


# %% Training

@torch.no_grad()
def estimate_loss(dpo, splits, args, device):
    """Mean loss over eval_iters batches of each split, and of the statistics DPO gives with it
    (as split_statistic: val_margin, ...). The batches are the same at every call (a fixed seed),
    so two estimates differ only because the model changed."""
    was_training = dpo.training
    dpo.eval()
    rank = dist.get_rank() if dist.is_initialized() else 0
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(args.seed + rank)
        batches = (get_batch(data, args.batch_size, args.block_size, device, generator)
                   for _ in range(args.eval_iters))
        # a bar once an estimate takes more than 5 s (a large vocabulary, a slow machine)
        batches = tqdm(batches, f"{name} loss", args.eval_iters, leave=False, delay=5)
        sums = {}
        for x, y in batches:
            statistics, loss = dpo(x, y)
            for key, value in {name: loss, **statistics}.items():
                key = key if key == name else f"{name}_{key}"
                sums[key] = sums.get(key, 0.0) + value.item() / args.eval_iters
        # the mean over every process's batches
        for key, total in zip(sums, all_reduce(list(sums.values())), strict=True):
            losses[key] = total / args.world_size
    dpo.train(was_training)
    return losses


def train(dpo, optimizer, train_data, val_data, args, device, step, history, on_checkpoint):
    """The optimizer's steps on random batches of pairs, with loss estimates (and DPO's statistics)
    every eval_interval steps and a progress line at least every few seconds, from `step` on;
    on_checkpoint(step, history) saves the state after every evaluation and when a signal stops
    training, and says where. Stage 09's loop, DPO's loss and statistics in it. Returns the
    history, the speed and that signal."""
    splits = {"train": train_data, "val": val_data}
    raw_dpo = dpo.module if isinstance(dpo, DDP) else dpo  # evaluation needs no syncing
    # what a step trains on, for its speed: a pair's two sequences
    rows = argparse.Namespace(**{**vars(args), "batch_size": 2 * args.batch_size})
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
                    losses = estimate_loss(raw_dpo, splits, args, device)
                check_finite(losses["val"], step)
                eval_seconds += time.time() - eval_start
                evaluations += 1
                seconds = time.time() - start
                history.append({"step": step, "seconds": round(clock + seconds, 3), **losses})
                print(f"step {step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, val margin {losses['val_margin']:.3f}, "
                      f"accuracy {losses['val_accuracy']:.2f}"
                      + progress(step, rows, last_line, eval_seconds, evaluations), flush=True)
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
            loss = train_step(dpo, optimizer, batches, args, step, scaler)
            step += 1
            check_finite(all_reduce([loss])[0], step)
            # a line every few seconds between evaluations (which print their own)
            evaluating = step % args.eval_interval == 0 or step == args.max_iters
            if time.time() - last_line[1] > 5 and not evaluating:
                print(f"step {step}: batch loss {loss:.4f}"
                      + progress(step, rows, last_line, eval_seconds, evaluations), flush=True)
                last_line = (step, time.time(), eval_seconds)
    seconds = time.time() - start
    tokens_per_step = rows.batch_size * args.block_size * args.grad_accum_steps * args.world_size
    tokens = (step - start_step) * tokens_per_step
    return history, tokens / max(seconds - eval_seconds, 1e-9), stop.received


def train_everywhere(dpo, optimizer, template, train_data, val_data, args, device, rank, step,
                     history):
    """train() of dpo in every process, DDP keeping their models the same, with checkpoints
    written by rank 0 (the policy's, and the digest of a frozen reference); then the processes
    leave together. Returns what train() returns."""

    def on_checkpoint(step, history):
        # every process takes part
        states = rng_states()
        path = checkpoint_path(args)
        if rank == 0:
            save_checkpoint(path, dpo.policy, optimizer, template, step, history, states, STAGE,
                            {"reference": dpo.reference_digest})
        return path

    ddp_dpo = DDP(dpo) if args.world_size > 1 else dpo
    result = train(ddp_dpo, optimizer, train_data, val_data, args, device, step, history,
                   on_checkpoint)
    del ddp_dpo
    if dist.is_initialized():
        # DDP keeps the process group in reference cycles: freed at exit instead, it can abort
        gc.collect()
        # leave together: a process gone early can abort the others' teardown
        dist.barrier()
        dist.destroy_process_group()
    return result


def real_reply_loss(model, template, args, device):
    """The loss on the real replies of Tiny Shakespeare's val conversations that fit the context
    (stage 08's val loss, on all of them at once): how far tuning moved the model from what
    fine-tuning on such replies taught it, on text it never chose between."""
    _, conversations = load_conversations()
    (inputs, targets), _, _ = fit(template, conversations, args.block_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(inputs.to(device), targets.to(device))[1].item()
    model.train(was_training)
    return loss, len(inputs)


def words(replies, template):
    """Of the runs of letters in the replies, the share that are words of Tiny Shakespeare
    (lowercased): whether they are still made of words, or of made-up ones such as `ozj`."""
    known = set(re.findall(r"[a-z]+", read_text().lower()))
    runs = [run.lower() for reply in replies
            for run in re.findall(r"[A-Za-z]+", template.decode(reply))]
    return sum(run in known for run in runs) / max(len(runs), 1)


def demo(dpo, template, pairs, args, device):
    """The model's replies to the first three val prompts, next to a preferred one; then, for the
    pairs made from Tiny Shakespeare, before DPO (the reference) and after: of SAMPLES replies to
    every val prompt (the same seed for both), how many ended their turn in the room the context
    leaves, the property the pairs prefer, and how many of their runs of letters are words; and
    the loss on the real replies of the val conversations."""
    # each prompt once: a prompt of the default pairs may have several
    firsts = {}
    for pair in pairs:
        firsts.setdefault(json.dumps(pair["prompt"]), pair)
    for pair in list(firsts.values())[:3]:
        for message in pair["prompt"]:
            print(f"{message['role']}: {message['content']}")
        print(f"{'-' * 30} preferred reply {'-' * 34}")
        print(pair["chosen"])
        prompt, _ = template.render(pair["prompt"], reply_next=True)
        sampler = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        print_samples(dpo.policy, template, prompt, args, device, {"the model's": sampler})
        print()
    if args.data:
        return
    prompts = [template.render(pair["prompt"], reply_next=True)[0] for pair in firsts.values()]
    prompts = prompts * SAMPLES
    reference = dpo.policy if dpo.reference is None else dpo.reference
    with adapters_off(dpo.policy) if dpo.reference is None else nullcontext():
        before = sample_replies(reference, template, prompts, args, device)
        loss_before, conversations = real_reply_loss(reference, template, args, device)
    after = sample_replies(dpo.policy, template, prompts, args, device)
    loss_after, _ = real_reply_loss(dpo.policy, template, args, device)
    ended = [sum(ended_its_turn(reply, template) for reply in replies)
             for replies in (before, after)]
    print(f"of {len(prompts)} replies to the val prompts, {SAMPLES} each, {ended[0]} ended their "
          f"turn in the context before DPO (the reference), {ended[1]} after; of their runs of "
          f"letters, {words(before, template):.0%} were words of Tiny Shakespeare before, "
          f"{words(after, template):.0%} after")
    print(f"the loss on the real replies of the {conversations} val conversations that fit: "
          f"{loss_before:.4f} before DPO, {loss_after:.4f} after")


# %% [markdown]
# ## Run it
# From a terminal, run this file with python; its flags change the hyperparameters (`--help`
# lists them). In a notebook, edit the hyperparameters cell above, its values or
# notebook_flags, and run all the cells again.

# %% Train, then sample
def add_flags(parser):
    """Stage 09's flags (the model to start from, LoRA, resume, sampling, the chat, --merge), three
    of them told anew for DPO, and DPO's own."""
    stage09.add_flags(parser)
    parser.set_defaults(out=f"runs/{STAGE}")
    parser.add_argument("--init-from", type=nonempty("a model"), metavar="NAME|DIR",
                        help="tune the --out folder of a run of stage 08, a merged one of stage "
                        "09, or a Llama or Qwen3 chat model: a Hugging Face hub name or a "
                        "save_pretrained folder (needs transformers) (default: "
                        f"{BASE}, made first if missing)")
    parser.add_argument("--lora-rank", type=checked("lora_rank", int), default=0, metavar="INT",
                        help="the adapters' rank r, the reference then the model with them off; "
                        "0: every weight trains, against a frozen copy of the model (on this "
                        "stage's small model, what taught its preference best)")
    parser.add_argument("--temperature", type=checked("temperature", float), default=1.0,
                        help="of the replies that --sample, --chat and the demo print (the default "
                        "pairs are sampled at 1); 0: greedy")
    parser.add_argument("--sft-weight", type=checked("sft_weight", float), default=1.0,
                        metavar="FLOAT", help="add this times the loss on the chosen replies "
                        "(trl's loss_type sft, RPO), which keeps them words; 0: DPO alone, whose "
                        "replies drift from words")
    parser.add_argument("--dpo-beta", type=checked("dpo_beta", float), default=0.1,
                        metavar="FLOAT", help="beta: how much a reward is worth against the "
                        "reference's log-probability, how far DPO may move the model from it")


DATA_HELP = ("the preference pairs of this JSONL file, one a line in trl's format, "
             '{"prompt": [messages], "chosen": [a reply], "rejected": [a reply]}, instead of '
             "those made from Tiny Shakespeare")
HELPS = {"batch_size": "preference pairs per training step (each two sequences)",
         "eval_iters": "batches of pairs averaged per loss estimate"}


def parse_flags(argv):
    """The flags, over the defaults of the recipe for the model they tune: `dpo` for a run of
    ours, `finetune` for a Hugging Face model. Adapters, few and from zero, take 4x its learning
    rate (of 1x to 8x, 4x learned most in stage 09)."""
    flags = dict(add_flags=add_flags, has_attention=True, data_help=DATA_HELP, helps=HELPS)
    args = parse_args(argv, STAGE, __doc__, RECIPES["dpo"], **flags)
    hugging_face = args.init_from and not stage_folder(args.init_from)
    recipe = RECIPES["finetune" if hugging_face else "dpo"]
    if args.lora_rank:
        recipe = {**recipe, "lr": 4 * recipe["lr"]}
    args = parse_args(argv, STAGE, __doc__, recipe, **flags)
    check_lora_flags(argv, args)
    return args


def main(argv=None):
    args = parse_flags(argv)
    rank, world_size, device = start_processes(args)
    if args.sample or args.chat:
        sample_only(args, device)
        return
    if args.merge:
        merge_only(args, STAGE)
        return

    checkpoint = starting_checkpoint(args, STAGE)
    # read first, so that a bad line is found before any model is loaded
    train_pairs, val_pairs = load_preferences(args.data) if args.data else (None, None)
    if not args.init_from:
        args.init_from = BASE
        if not checkpoint and not stage_folder(BASE):
            make_base(BASE, [BASE_SCRIPT])
    model, template = make_model(args, checkpoint, device, rows_per_example=2)
    if model.first_new_row < model.config.vocab_size:
        raise UserError(f"{args.init_from} holds a model with no chat template yet "
                        f"({trained_at(Path(args.init_from) / 'ckpt.pt')}): DPO tunes a chat "
                        "model, a run of stage 08, a merged one of 09, or a Llama or Qwen3 chat "
                        "model")
    reference = make_reference(args, model, checkpoint, device)
    if not args.data:
        train_pairs, val_pairs = shakespeare_preferences(model, template, args, device)
    train_data, val_data = preference_data(args, template, train_pairs, val_pairs)
    check_token_ids([train_data[0], val_data[0]], model.config.vocab_size, args.init_from)
    print("DPO on preference pairs: the loss raises each chosen reply against its rejected one, "
          "relative to the reference; a reward is beta times the log-probability a reply gained")
    dpo = DPO(model, reference, args.dpo_beta, args.sft_weight)
    optimizer = configure_optimizer(model, args)
    step, history = 0, []
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history = checkpoint["step"], checkpoint["history"]
        set_rng_state(checkpoint["rng_states"], rank, world_size)
        print(f"resuming from step {step} of {checkpoint_path(args)}")
    n_params = describe(model, template, args, device, rows_per_example=2)

    history, tokens_per_second, stopped_by = train_everywhere(
        dpo, optimizer, template, train_data, val_data, args, device, rank, step, history)
    if rank > 0:
        return
    if history:
        # DPO's loss has no bits per character
        path = report.save_metrics(args.out, {
            "stage": STAGE, "config": vars(args), "parameters": n_params,
            "tokenizer": template.identity(), "vocab_size": template.vocab_size,
            "device": str(device), "history": history, "tokens_per_second": tokens_per_second,
            "train_loss": history[-1]["train"], "val_loss": history[-1]["val"],
            "val_bpc": None})
        print(f"metrics written to {path}")
        print(overfitting(history), end="")
    if stopped_by == signal.SIGTERM:
        # the job is being stopped: no demo; run() exits with status 143
        return stopped_by
    if args.plot_attention:
        # the first val pair's chosen row, its first tokens
        report.plot_attention(model, template, val_data[0][0, 0, :32], args.out)

    demo(dpo, template, val_pairs, args, device)
    print(f"the model is in {checkpoint_path(args)}; talk to it with python {STAGE}.py --chat "
          f"--out {args.out}")
    # a run Ctrl-C cut short exits with status 130, after its demo
    return stopped_by


if __name__ == "__main__":
    run(main, notebook_flags)
