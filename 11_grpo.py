# %% [markdown]
"""11_grpo.py: learn from a reward a program checks: reinforcement learning (GRPO).

New here, in what a step is: no examples to copy and no pairs to prefer, only problems and a
program that checks a reply. Each step samples G replies to each of a batch of problems from the
model itself (at temperature 1, with the KV cache), scores each reply with the checker (1 right,
0 wrong), and pushes up the replies that scored above their group's mean and down those below:
a reply's advantage is its reward minus its group's mean (divided by the group's std with
--scale-rewards), and the loss is -advantage x log p of each of its tokens, averaged over all
the sampled tokens of the batch (DAPO) or per reply first (--loss-norm grpo). That is GRPO (Shao
et al. 2024, the RL of DeepSeek-R1): no value model, no reward model. Its other switches are
flags too: PPO's clipped ratio, for several updates on each batch of replies (--updates), and a
KL penalty towards the model RL started from (--kl-beta; the reference is a frozen copy or, with
adapters, the model with them off). Logged at every evaluation, on held-out problems: pass@1 (the
share of replies that are right), pass@G (of problems with a right reply among G), the replies'
length.

The task, --task backwards: a word of Tiny Shakespeare's to write backwards ("fair backwards":
"riaf"), problems a program makes and checks. RL starts from a model that has learned the
task's format: stage 08 fine-tuned on the 2,957 train words and their answers (runs/08_backwards,
made first if it is not there), or --init-from a run of stage 08 or a Llama or Qwen3 chat model
(--task gsm8k: GSM8K's problems, the number after ####, with --data or from the hub). This stage
builds on stage 09 and imports it: the model and its adapters, loading a chat model, checkpoints
and exact resume, Ctrl-C and torchrun, the training step, the samplers and the chat are 09's;
what this file holds is GRPO's and its tasks'.

Run with no flags for the run measured below (2-core CPU); --help lists the flags.
Expect: 600 steps of 16 problems x 8 replies, every weight trained; on 128 held-out words,
pass@1 0.368 -> 0.876 and pass@8 0.727 -> 0.945, in 2 minutes on a 2-core CPU (after the
fine-tuning on the task that it starts from). Checkpoint in runs/11_grpo/.
Then ask it for words backwards, each question answered on its own, greedily:
    python 11_grpo.py --chat
"""
# %%
import argparse
import copy
import gc
import importlib
import json
import random
import re
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from shared import UserError, atomic_write, duration, report
from shared.cli import checked, nonempty, parse_args, run
from shared.data import check_token_ids, read_file, read_text
from shared.device import all_reduce
from shared.hub import hub_dataset, weights_digest

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
# training: the optimizer, a step on any loss, Ctrl-C, the loss of the right answers
configure_optimizer = stage09.configure_optimizer
train_step = stage09.train_step
autocast = stage09.autocast
StopOnSignal = stage09.StopOnSignal
check_finite = stage09.check_finite
estimate_loss = stage09.estimate_loss
# sampling, the chat and merging
generate = stage09.generate
ended_its_turn = stage09.ended_its_turn
print_samples = stage09.print_samples
sample_only = stage09.sample_only
merge_only = stage09.merge_only
adapter_state = stage09.adapter_state

# the stage's name, in what it writes (in a notebook there is no file name to read)
STAGE = "11_grpo"
# without --init-from, RL starts from stage 08 fine-tuned on the task (its base), made first if
# missing: on every solved train problem, for 400 steps (on 270 of them for 100 steps, no
# held-out reply was right: RL would have had nothing to push up)
BASE_SCRIPT = "08_chat.py"
SFT_FLAGS = ["--max-iters", "400", "--eval-interval", "100"]


# %% Hyperparameters: the flags' defaults (batch_size is --batch-size); edit them in a notebook
# In a notebook this list is the command line: any flag, e.g. ["--kl-beta", "0.04"]
notebook_flags = []
# Recipes: `grpo` for a model of ours (a batch is 16 problems, G replies each), `finetune` for a
# Hugging Face model: a small learning rate, so that it adapts, not forgets.
RECIPES = {
    "grpo": dict(batch_size=16, max_iters=600, eval_interval=100, eval_iters=8, lr=4e-4,
                 warmup_iters=0, weight_decay=0.0, grad_clip=1.0, grad_accum_steps=1,
                 dropout=0.0),
    "finetune": dict(batch_size=8, max_iters=200, eval_interval=50, eval_iters=4, lr=1e-6,
                     warmup_iters=10, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1,
                     dropout=0.0),
}


# %% GRPO: replies sampled and checked, their advantages, the loss

def rollout(model, task, template, problems, args, device):
    """G = args.group_size replies of the model to each problem, sampled at temperature 1 (each
    group's rows one after another), and their rewards: the task's checker on a reply that ended
    its turn within the task's reply_tokens, 0 for one that did not. Returned as rows to learn
    from: inputs and targets of the prompts and replies, learned on the replies' tokens only."""
    problems = [problem for problem in problems for _ in range(args.group_size)]
    starts = [template.render(task.messages(problem), reply_next=True)[0] for problem in problems]
    replies = sample_replies(model, template, starts, task.reply_tokens, device)
    rewards = [task.reward(problem, template.decode(reply)) if ended_its_turn(reply, template)
               else 0.0 for problem, reply in zip(problems, replies, strict=True)]
    width = max(len(start) + len(reply) for start, reply in zip(starts, replies, strict=True))
    ids, learned = [], []
    for start, reply in zip(starts, replies, strict=True):
        padding = width - len(start) - len(reply)
        ids.append(start + reply + [template.end] * padding)
        learned.append([False] * len(start) + [True] * len(reply) + [False] * padding)
    ids, learned = torch.tensor(ids), torch.tensor(learned)
    targets = ids[:, 1:].masked_fill(~learned[:, 1:], -1)
    return ids[:, :-1].to(device), targets.to(device), torch.tensor(rewards, device=device)


@torch.no_grad()
def sample_replies(model, template, starts, max_new_tokens, device):
    """The model's continuation of each start (token ids), sampled at temperature 1, to its end
    token or for max_new_tokens, in the room the context leaves it. A batch for each length of
    start."""
    replies = [None] * len(starts)
    by_length = {}
    for i, start in enumerate(starts):
        by_length.setdefault(len(start), []).append(i)
    for length, indices in by_length.items():
        context = torch.tensor([starts[i] for i in indices], device=device)
        room = min(max_new_tokens, model.block_size + 1 - length)
        rows = generate(model, context, room, stop=template.end)
        for i, row in zip(indices, rows[:, length:].tolist(), strict=True):
            ended = template.end in row
            replies[i] = row[:row.index(template.end) + 1] if ended else row
    return replies


def group_advantages(rewards, group_size, scale):
    """Each reply's reward minus the mean of its group (the replies to the same problem): those
    above it are pushed up, those below down, and a group all right or all wrong teaches nothing.
    With scale, divided by the group's std as well (GRPO's; Dr. GRPO leaves it out, since it
    weighs problems that are nearly always or nearly never solved above the others)."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.view(-1)


def token_logps(model, x, y):
    """The log-probability of each target token (0 where the target is -1), in float32: worked out
    where a token is learned only, since a float32 copy of the logits over the whole vocabulary
    at every position of the prompts too would take most of a step's memory."""
    logits, _ = model(x)
    learned = y != -1
    logps = F.log_softmax(logits[learned], dim=-1, dtype=torch.float32)
    per_token = torch.zeros(y.shape, device=y.device)
    per_token[learned] = logps.gather(-1, y[learned].unsqueeze(-1)).squeeze(-1)
    return per_token


class GRPO(nn.Module):
    """GRPO's loss on a batch of sampled replies (inputs x, targets y learned on the replies'
    tokens), each with its advantage, as trl computes it: per token, -min(ratio A, clip(ratio)
    A), ratio being the token's probability now over when it was sampled (old_logps; None: the
    model has not changed since, and the ratio is 1 with the gradient of log p), clipped to 1 +-
    clip_epsilon; plus kl_beta times an estimate of the KL from the reference, exp(d) - d - 1
    with d = log p_ref - log p, times the ratio (the tokens were drawn from the model as it was).
    Averaged over all the batch's reply tokens (dapo), over each reply's then over the replies
    (grpo), or summed and divided by the rows times the task's reply_tokens (dr_grpo); with
    --grad-accum-steps or several processes, dapo's is each batch's mean, where trl divides by
    the tokens of all of them. The reference is the policy with its adapters off under LoRA
    (reference None), else a frozen copy of the model RL started from, if kl_beta is not 0.
    Called as stage 09's model is, on a batch, it returns what it computed (each token's
    log-probability) and the loss."""

    def __init__(self, policy, reference, args, reply_tokens):
        super().__init__()
        self.policy = policy
        self.reference = reference
        self.kl_beta = args.kl_beta
        self.clip_epsilon = args.clip_epsilon
        self.loss_norm = args.loss_norm
        self.reply_tokens = reply_tokens
        # what a resumed run checks its reference against
        self.reference_digest = None if reference is None else weights_digest(reference)

    def train(self, mode=True):
        """Train or evaluate the policy; a reference copy stays in eval mode, with no dropout."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    @torch.no_grad()
    def reference_logps(self, x, y):
        if self.reference is not None:
            return token_logps(self.reference, x, y)
        with adapters_off(self.policy):
            return token_logps(self.policy, x, y)

    def kl(self, logps, x, y):
        """Per token, the estimate of the KL from the reference (0 where nothing is learned)."""
        difference = self.reference_logps(x, y) - logps
        return (torch.exp(difference) - difference - 1) * (y != -1)

    def forward(self, x, y, advantages, old_logps=None):
        learned = y != -1
        logps = token_logps(self.policy, x, y)
        if old_logps is None:
            old_logps = logps.detach()
        ratio = torch.exp(logps - old_logps)
        clipped = ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon)
        per_token = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
        if self.kl_beta:
            per_token = per_token + self.kl_beta * self.kl(logps, x, y) * ratio
        per_token = per_token * learned
        if self.loss_norm == "dapo":
            loss = per_token.sum() / learned.sum().clamp(min=1)
        elif self.loss_norm == "grpo":
            loss = (per_token.sum(dim=1) / learned.sum(dim=1).clamp(min=1)).mean()
        else:
            loss = per_token.sum() / (len(x) * self.reply_tokens)
        return logps, loss


def make_reference(args, model, checkpoint, device):
    """The KL penalty's reference: None without one (--kl-beta 0), and under LoRA, where it is the
    model with its adapters off; else a frozen copy of the model RL starts from, which a resumed
    run loads again and checks to be the one it started from."""
    if model.lora or not args.kl_beta:
        return None
    if not checkpoint:
        return copy.deepcopy(model).requires_grad_(False).eval()
    reference, _ = load_model(args.init_from, args.block_size)
    if weights_digest(reference) != checkpoint["state"]["reference"]:
        raise UserError(f"{args.init_from} has changed since this run started from it; resume "
                        "with the model it started from, the KL penalty's reference")
    return reference.requires_grad_(False).eval().to(device)


# %% Tasks: problems, and a program that checks a reply

class Backwards:
    """A word of Tiny Shakespeare's, of 3 to 5 letters, to write backwards: "fair backwards" is
    answered "riaf" and nothing else. A program makes the problems and checks the replies; 300
    words are kept out of training, for measuring. A task is an object like this one: its train
    and val problems, each problem's messages and a right answer (for fine-tuning first, and for
    the loss), a reward for a reply, 1 if it is right, else 0, and the folder of the model RL
    starts from without --init-from, stage 08 fine-tuned on it (make_task_base)."""

    name = "backwards"
    # the room a reply gets: the longest answer and its end token, with some to spare
    reply_tokens = 12
    base = "runs/08_backwards"

    def __init__(self, args):
        if args.data:
            raise UserError(f"--data gives --task gsm8k its problems; --task {self.name} makes its "
                            "own")
        words = sorted({w for w in re.findall(r"[a-z]+", read_text().lower()) if 3 <= len(w) <= 5})
        random.Random(0).shuffle(words)
        self.train, self.val = words[:-300], words[-300:]

    def messages(self, word):
        return [{"role": "user", "content": f"{word} backwards"}]

    def answer(self, word):
        return word[::-1]

    def reward(self, word, reply):
        return float(reply == word[::-1])


class GSM8K:
    """Grade-school arithmetic in words (Cobbe et al. 2021), for a Hugging Face chat model: the
    answer is the number after the #### that ends a solution, a reply is right when it ends the
    same way (which the question asks for). Its problems are --data's JSONL lines, {"question":
    ..., "answer": ...} as GSM8K has them (the last tenth kept for measuring), or without --data
    GSM8K's own train and test splits from the hub (needs the datasets package)."""

    name = "gsm8k"
    reply_tokens = 512
    # no model of ours writes a solution: RL starts from a chat model given with --init-from
    base = None

    def __init__(self, args):
        if args.data:
            problems = [gsm8k_problem(line, number, args.data)
                        for number, line in enumerate(read_file(args.data).splitlines(), 1)
                        if line.strip()]
            if len(problems) < 2:
                raise UserError(f"--data {args.data} has fewer than two problems; give some "
                                "to train on and some to measure")
            n = min(int(0.9 * len(problems)), len(problems) - 1)
            self.train, self.val = problems[:n], problems[n:]
        else:
            splits = hub_dataset("openai/gsm8k", "main", "give its problems with --data")
            self.train, self.val = list(splits["train"]), list(splits["test"])

    def messages(self, problem):
        ask = "Reason step by step, then end with #### and the answer, a number alone."
        return [{"role": "user", "content": f"{problem['question']}\n{ask}"}]

    def answer(self, problem):
        return problem["answer"]

    def reward(self, problem, reply):
        right = final_number(problem["answer"])
        return float(right is not None and final_number(reply) == right)


def gsm8k_problem(line, number, path):
    """A line of a GSM8K file as a problem, or one sentence that says what is wrong with it."""
    try:
        problem = json.loads(line)
        if final_number(problem["answer"]) is not None and isinstance(problem["question"], str):
            return problem
    except (ValueError, TypeError, KeyError):
        pass
    raise UserError(f"--data {path}, line {number}: not a GSM8K problem, "
                    '{"question": "...", "answer": "... #### 42"}')


def final_number(text):
    """The number after the last #### of text (1,000 and $1000.00 read as 1000), or None."""
    found = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    return float(found[-1].replace(",", "")) if found else None


TASKS = {task.name: task for task in (Backwards, GSM8K)}


def make_task_base(task):
    """Stage 08 fine-tuned on the task's train problems and their answers (written to
    task.base/sft.jsonl), into task.base, by stage 09's make_base (which makes stage 07's default
    run first if it is missing): the model that RL starts from without --init-from, which has
    learned the task's format and solves some of its problems."""
    lines = [json.dumps({"messages": [*task.messages(problem), {"role": "assistant",
                                                                "content": task.answer(problem)}]})
             for problem in task.train]
    with atomic_write(Path(task.base) / "sft.jsonl", "w") as f:
        f.write("".join(line + "\n" for line in lines))
    make_base(task.base, [BASE_SCRIPT, "--data", f"{task.base}/sft.jsonl", "--out", task.base,
                          *SFT_FLAGS])


def drop_what_does_not_fit(task, template, block_size):
    """The task's problems, less those whose question leaves a reply no room in the context
    (said, with their count); none left is refused in one sentence, before any sampling."""
    for name in ("train", "val"):
        problems = getattr(task, name)
        kept = [problem for problem in problems
                if len(template.render(task.messages(problem), reply_next=True)[0]) < block_size]
        if len(kept) < len(problems):
            print(f"{name}: {len(problems) - len(kept):,} of {len(problems):,} problems dropped: "
                  f"their question leaves a reply no room in --block-size {block_size} tokens")
        if not kept:
            raise UserError(f"no {name} problem's question leaves a reply room in --block-size "
                            f"{block_size} tokens; give a model with a longer context, or "
                            "shorter problems")
        setattr(task, name, kept)


def answer_data(task, template, problems, block_size):
    """The problems with their right answers, for the loss: inputs and targets (all the tokens but
    the last, all but the first) as wide as the longest, at most block_size, learned on the answer
    and its end token (stage 08's mask; -1 where nothing is learned)."""
    rows = []
    for problem in problems:
        answer = {"role": "assistant", "content": task.answer(problem)}
        ids, learned = template.render([*task.messages(problem), answer])
        rows.append((ids[:block_size + 1], learned[:block_size + 1]))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [template.end] * (width - len(ids)) for ids, _ in rows])
    learned = torch.tensor([learned + [False] * (width - len(learned)) for _, learned in rows])
    return ids[:, :-1], ids[:, 1:].masked_fill(~learned[:, 1:], -1)


# %% Training

@torch.no_grad()
def evaluate(grpo, task, template, args, device):
    """The model's G replies to each of the first eval_iters x batch_size val problems, drawn from
    the run's seed (the same draws at every call, in every process): pass@1, the share of the
    replies that are right (reward 1); pass@G, the share of the problems with a right reply among
    their G; the mean reward and the replies' mean length in tokens; with a KL penalty, the KL
    estimate per token."""
    was_training = grpo.training
    grpo.eval()
    rewards, lengths, kl = [], [], []
    problems = task.val[:args.eval_iters * args.batch_size]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        for first in range(0, len(problems), args.batch_size):
            batch = problems[first:first + args.batch_size]
            x, y, reward = rollout(grpo.policy, task, template, batch, args, device)
            rewards.append(reward.view(-1, args.group_size))
            lengths.append((y != -1).sum(dim=1).float())
            if grpo.kl_beta:
                per_token = grpo.kl(token_logps(grpo.policy, x, y), x, y)
                kl.append(per_token.sum() / (y != -1).sum())
    grpo.train(was_training)
    rewards = torch.cat(rewards)
    right = (rewards == 1).float()
    results = {"reward": rewards.mean().item(), "pass@1": right.mean().item(),
               f"pass@{args.group_size}": right.amax(dim=1).mean().item(),
               "length": torch.cat(lengths).mean().item()}
    if kl:
        results["kl"] = torch.stack(kl).mean().item()
    return results


def progress(step, args, last_line, eval_seconds, evaluations):
    """Stage 09's progress line, with replies a second in place of tokens: the speed of the
    training steps since the last line printed (last_line: its step, time and seconds of
    evaluation so far), and how long the rest of the run will take: the steps left at that speed,
    and the evaluations left at what each took so far (this run has made evaluations of them, in
    eval_seconds)."""
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
    replies = args.batch_size * args.group_size * args.grad_accum_steps * args.world_size
    return (f" | {1000 * step_seconds:.1f} ms/step, {replies / step_seconds:,.0f}"
            f" replies/s, {duration(left)} left")


def train(grpo, optimizer, task, template, args, device, step, history, on_checkpoint):
    """The optimizer's steps, each on the replies sampled to a batch of random train problems (of
    each process's own), with an evaluation every eval_interval steps (the right answers' loss;
    pass@1, pass@G and the mean reward on val problems) and a progress line with the step's mean
    reward at least every few seconds, from `step` on; on_checkpoint(step, history) saves the
    state after every evaluation and when a signal stops training, and says where. Stage 09's
    loop, with replies sampled and checked in it. Returns the history, the speed (reply tokens a
    second) and that signal."""
    raw_grpo = grpo.module if isinstance(grpo, DDP) else grpo  # evaluation needs no syncing
    splits = {name: answer_data(task, template, problems, args.block_size)
              for name, problems in (("train", task.train), ("val", task.val))}
    history = list(history)
    start_step = step
    # the history's clock: seconds of this run, resumes included (not the time between them)
    clock = history[-1]["seconds"] if history else 0.0
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    start = time.time()
    eval_seconds = 0.0
    evaluations = 0
    last_line = (step, start, eval_seconds)
    # the replies' tokens sampled and learned from
    tokens = 0
    with StopOnSignal() as stop:
        while True:
            due = step % args.eval_interval == 0 or step == args.max_iters
            # a resumed run has the evaluation of its first step already
            if due and (step > start_step or not history):
                eval_start = time.time()
                with autocast(args, device):
                    losses = estimate_loss(raw_grpo.policy, splits, args, device)
                    results = evaluate(raw_grpo, task, template, args, device)
                check_finite(losses["val"], step)
                eval_seconds += time.time() - eval_start
                evaluations += 1
                seconds = time.time() - start
                history.append({"step": step, "seconds": round(clock + seconds, 3), **losses,
                                **{f"val_{key}": value for key, value in results.items()}})
                kl = f", KL {results['kl']:.4f}" if "kl" in results else ""
                print(f"step {step}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, val pass@1 {results['pass@1']:.3f}, "
                      f"pass@{args.group_size} {results[f'pass@{args.group_size}']:.3f}, "
                      f"{results['length']:.1f} tokens a reply{kl}"
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
            batches = []
            for _ in range(args.grad_accum_steps):
                problems = [task.train[i] for i in torch.randint(len(task.train),
                                                                 (args.batch_size,))]
                with autocast(args, device):
                    x, y, reward = rollout(raw_grpo.policy, task, template, problems, args,
                                           device)
                advantages = group_advantages(reward, args.group_size, args.scale_rewards)
                # with one update the ratio is 1; with more, it is to the model that sampled
                old_logps = None
                if args.updates > 1:
                    with torch.no_grad(), autocast(args, device):
                        old_logps = token_logps(raw_grpo.policy, x, y)
                batches.append((x, y, advantages, old_logps))
                tokens += (y != -1).sum().item()
            for _ in range(args.updates):
                loss = train_step(grpo, optimizer, batches, args, step, scaler)
            step += 1
            check_finite(all_reduce([loss])[0], step)
            # the next replies are sampled from the weights this step left, before any loss
            # could show that they diverged
            if not all(torch.isfinite(p).all() for p in raw_grpo.policy.parameters()):
                raise UserError(f"the weights became inf or NaN at step {step}: training "
                                "diverged; try a smaller --lr")
            # a line every few seconds between evaluations (which print their own)
            evaluating = step % args.eval_interval == 0 or step == args.max_iters
            if time.time() - last_line[1] > 5 and not evaluating:
                print(f"step {step}: mean reward {reward.mean():.3f}"
                      + progress(step, args, last_line, eval_seconds, evaluations), flush=True)
                last_line = (step, time.time(), eval_seconds)
    seconds = time.time() - start
    tokens = all_reduce([tokens])[0]
    return history, tokens / max(seconds - eval_seconds, 1e-9), stop.received


def train_everywhere(grpo, optimizer, task, template, args, device, rank, step, history):
    """train() of grpo in every process, DDP keeping their models the same, with checkpoints
    written by rank 0 (the policy's, and the digest of a frozen reference); then the processes
    leave together. Returns what train() returns."""

    def on_checkpoint(step, history):
        # every process takes part
        states = rng_states()
        path = checkpoint_path(args)
        if rank == 0:
            save_checkpoint(path, grpo.policy, optimizer, template, step, history, states, STAGE,
                            {"reference": grpo.reference_digest})
        return path

    ddp_grpo = DDP(grpo) if args.world_size > 1 else grpo
    result = train(ddp_grpo, optimizer, task, template, args, device, step, history,
                   on_checkpoint)
    del ddp_grpo
    if dist.is_initialized():
        # DDP keeps the process group in reference cycles: freed at exit instead, it can abort
        gc.collect()
        # leave together: a process gone early can abort the others' teardown
        dist.barrier()
        dist.destroy_process_group()
    return result


def describe(model, template, args, device):
    """Print what is trained, where, and how many replies a step learns from; return the
    parameter count."""
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters (every weight and bias; a tied head counted once), "
          f"{template.vocab_size} tokens, on {device} in {args.dtype}; weights {args.init_from}")
    if model.lora:
        trained = sum(t.numel() for t in adapter_state(model).values())
        print(f"{trained:,} of them trained ({trained / n_params:.2%}): the adapters of rank "
              f"{model.lora['lora_rank']}, and any new tokens' rows")
    replies = args.batch_size * args.group_size * args.grad_accum_steps * args.world_size
    print(f"{args.batch_size} problems x {args.group_size} replies x {args.grad_accum_steps} "
          f"accumulation x {args.world_size} process(es) = {replies:,} replies per step")
    return n_params


def demo(grpo, task, template, history, args, device):
    """The model's replies to the first three val problems, each next to a right answer; then
    held-out pass@1 and pass@G before RL (the first evaluation) and after."""
    for problem in task.val[:3]:
        for message in task.messages(problem):
            print(f"{message['role']}: {message['content']}")
        print(f"{'-' * 30} a right answer {'-' * 35}")
        print(task.answer(problem))
        prompt, _ = template.render(task.messages(problem), reply_next=True)
        sampler = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        print_samples(grpo.policy, template, prompt, args, device, {"the model's": sampler})
        print()
    first, last = history[0], history[-1]
    best_of = f"pass@{args.group_size}"
    print(f"held-out pass@1 {first['val_pass@1']:.3f} before RL (step {first['step']}), "
          f"{last['val_pass@1']:.3f} after (step {last['step']}); {best_of} "
          f"{first[f'val_{best_of}']:.3f} -> {last[f'val_{best_of}']:.3f}")


# %% [markdown]
# ## Run it
# From a terminal, run this file with python; its flags change the hyperparameters (`--help`
# lists them). In a notebook, edit the hyperparameters cell above, its values or
# notebook_flags, and run all the cells again.

# %% Train, then sample
def add_flags(parser):
    """Stage 09's flags (the model to start from, LoRA, resume, sampling, the chat, --merge), three
    of them told anew for RL, and GRPO's own."""
    stage09.add_flags(parser)
    parser.set_defaults(out=f"runs/{STAGE}")
    parser.add_argument("--init-from", type=nonempty("a model"), metavar="NAME|DIR",
                        help="tune the --out folder of a run of stage 08, a merged one of stage "
                        "09, or a Llama or Qwen3 chat model: a Hugging Face hub name or a "
                        "save_pretrained folder (needs transformers) (default: stage 08 "
                        "fine-tuned on the task, runs/08_backwards for --task backwards, made "
                        "first if missing)")
    parser.add_argument("--lora-rank", type=checked("lora_rank", int), default=0, metavar="INT",
                        help="the adapters' rank r, the KL penalty's reference then the model "
                        "with them off; 0: every weight trains")
    parser.add_argument("--temperature", type=checked("temperature", float), default=0.0,
                        help="of the replies that --sample, --chat and the demo print (RL samples "
                        "the replies it learns from at 1); 0: greedy, the likeliest answer")
    parser.add_argument("--task", choices=list(TASKS), default="backwards",
                        help="the problems and their checker")
    parser.add_argument("--group-size", type=checked("group_size", int), default=8,
                        metavar="INT", help="G: the replies sampled to each problem")
    parser.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=False,
                        help="divide each advantage by its group's std, as GRPO does")
    parser.add_argument("--loss-norm", choices=["dapo", "grpo", "dr_grpo"], default="dapo",
                        help="average the loss over the batch's reply tokens (dapo), over each "
                        "reply's then the replies (grpo), or divide its sum by the replies x "
                        "the task's longest reply (dr_grpo)")
    parser.add_argument("--updates", type=checked("updates", int), default=1, metavar="INT",
                        help="optimizer steps on each batch of replies; from the second on, "
                        "PPO's clip holds each token's probability ratio within 1 +- "
                        "--clip-epsilon")
    parser.add_argument("--clip-epsilon", type=checked("clip_epsilon", float), default=0.2,
                        metavar="FLOAT", help="how far a ratio may move before the clip stops it")
    parser.add_argument("--kl-beta", type=checked("kl_beta", float), default=0.0,
                        metavar="FLOAT", help="add beta times the KL from the model RL started "
                        "from; 0: no penalty and no reference kept")


DATA_HELP = ("--task gsm8k's problems: a JSONL file with a problem a line, "
             '{"question": ..., "answer": "... #### 42"}, instead of GSM8K from the hub')
HELPS = {"batch_size": "problems per training step, each answered --group-size times",
         "eval_iters": "batches of val problems per evaluation: their answers' loss is averaged, "
                       "and pass@1 and pass@G are measured on the first eval_iters x batch_size "
                       "of them"}


def parse_flags(argv):
    """The flags, over the defaults of the recipe for the model they tune: `grpo` for a run of
    ours, `finetune` for a Hugging Face model. Adapters, few and from zero, take 4x its learning
    rate (of 1x to 8x, 4x learned most in stage 09)."""
    flags = dict(add_flags=add_flags, has_attention=True, data_help=DATA_HELP, helps=HELPS)
    args = parse_args(argv, STAGE, __doc__, RECIPES["grpo"], **flags)
    hugging_face = args.init_from and not stage_folder(args.init_from)
    recipe = RECIPES["finetune" if hugging_face else "grpo"]
    if args.lora_rank:
        recipe = {**recipe, "lr": 4 * recipe["lr"]}
    args = parse_args(argv, STAGE, __doc__, recipe, **flags)
    check_lora_flags(argv, args)
    if args.group_size < 2:
        raise UserError("--group-size must be 2 or more: a reply's advantage is how it compares "
                        "with the others of its group")
    return args


def main(argv=None):
    args = parse_flags(argv)
    rank, world_size, device = start_processes(args)
    if args.sample or args.chat:
        # a task's questions are not a conversation: each is answered on its own
        sample_only(args, device, keep_conversation=False)
        return
    if args.merge:
        merge_only(args, STAGE)
        return

    checkpoint = starting_checkpoint(args, STAGE)
    # made or read first, so that a bad --data line is found before any model is loaded
    task = TASKS[args.task](args)
    if not args.init_from:
        if not task.base:
            raise UserError(f"--task {task.name} starts from a chat model that solves some of its "
                            "problems: give one with --init-from, such as Qwen/Qwen3-0.6B (and "
                            "the same when resuming)")
        args.init_from = task.base
        if not checkpoint and not stage_folder(task.base):
            make_task_base(task)
    # a step learns from G replies to each of its problems
    model, template = make_model(args, checkpoint, device, rows_per_example=args.group_size)
    if model.first_new_row < model.config.vocab_size:
        raise UserError(f"{args.init_from} holds a model with no chat template yet "
                        f"({trained_at(Path(args.init_from) / 'ckpt.pt')}): RL tunes a chat "
                        "model, a run of stage 08, a merged one of 09, or a Llama or Qwen3 chat "
                        "model")
    drop_what_does_not_fit(task, template, args.block_size)
    reference = make_reference(args, model, checkpoint, device)
    prompts = [template.render(task.messages(problem), reply_next=True)[0]
               for problem in task.train + task.val]
    check_token_ids(prompts, model.config.vocab_size, args.init_from)
    print(f"GRPO on {task.name}: {len(task.train):,} train problems, {len(task.val):,} val; "
          f"{args.group_size} replies to each problem, pushed up or down by how their reward "
          "compares with their group's mean")
    grpo = GRPO(model, reference, args, task.reply_tokens)
    optimizer = configure_optimizer(model, args)
    step, history = 0, []
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history = checkpoint["step"], checkpoint["history"]
        set_rng_state(checkpoint["rng_states"], rank, world_size)
        print(f"resuming from step {step} of {checkpoint_path(args)}")
    n_params = describe(model, template, args, device)

    history, tokens_per_second, stopped_by = train_everywhere(
        grpo, optimizer, task, template, args, device, rank, step, history)
    if rank > 0:
        return
    if history:
        # the loss of the right answers, in nats per token; a reward has no bits per character
        path = report.save_metrics(args.out, {
            "stage": STAGE, "config": vars(args), "parameters": n_params,
            "tokenizer": template.identity(), "vocab_size": template.vocab_size,
            "device": str(device), "history": history, "tokens_per_second": tokens_per_second,
            "train_loss": history[-1]["train"], "val_loss": history[-1]["val"],
            "val_bpc": None})
        print(f"metrics written to {path}")
    if stopped_by == signal.SIGTERM:
        # the job is being stopped: no demo; run() exits with status 143
        return stopped_by
    if args.plot_attention:
        # the first val problem and its right answer
        problem = task.val[0]
        answer = {"role": "assistant", "content": task.answer(problem)}
        ids, _ = template.render([*task.messages(problem), answer])
        report.plot_attention(model, template, torch.tensor(ids[:32]), args.out)

    demo(grpo, task, template, history, args, device)
    print(f"the model is in {checkpoint_path(args)}; talk to it with python {STAGE}.py --chat "
          f"--out {args.out}")
    # a run Ctrl-C cut short exits with status 130, after its demo
    return stopped_by


if __name__ == "__main__":
    run(main, notebook_flags)
