"""HellaSwag, the benchmark GPT-2 is measured by: 10,042 short contexts, each with four endings
of which one is right, and the model picks the ending it finds likeliest.

Scored in completion style, as build-nanogpt scores it: each ending is appended to its context
and the model's loss is taken over the ending's own tokens. Two accuracies come of it:
- acc_norm: the ending with the lowest mean loss per token wins (the number quoted for GPT-2:
  0.2955 for OpenAI's 124M weights);
- acc: the ending with the lowest total loss wins (0.2859 for the same weights).
EleutherAI's evaluation harness normalises by the ending's length in characters instead, and
quotes 0.3114 acc_norm and 0.2892 acc for GPT-2 124M: compare numbers of one method only.
"""
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from shared import UserError
from shared.data import download, read_file
from shared.device import all_reduce

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# the SHA-256 that Hugging Face datasets records for this URL (12,246,618 bytes)
SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "hellaswag_val.jsonl"


def read_examples(path=None):
    """The examples of a file in HellaSwag's format (a JSON object a line, with "ctx", four
    "endings" and the right one's index, "label"), each as (context, endings, label). Without a
    path, HellaSwag's validation set, downloaded into data/ on first use."""
    if path is None:
        path = DEFAULT_PATH
        if not path.exists():
            download(path, URL, SHA256, "HellaSwag's validation set",
                     "score a file of your own with --hellaswag FILE")
    examples = []
    for number, line in enumerate(read_file(path, "--hellaswag ").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
            context, endings, label = example["ctx"], example["endings"], int(example["label"])
            if not (isinstance(context, str) and len(endings) == 4 and 0 <= label < 4
                    and all(isinstance(ending, str) and ending for ending in endings)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--hellaswag {path}, line {number}: not a HellaSwag example (\"ctx\", "
                            "four \"endings\" and a \"label\" from 0 to 3)") from None
        examples.append((context, endings, label))
    if not examples:
        raise UserError(f"--hellaswag {path} holds no examples")
    return examples


def tokenize(examples, tokenizer, block_size):
    """Each example as four rows of tokens (context, then an ending), where each ending starts,
    and its label. A row longer than block_size keeps its last block_size tokens. Examples with
    text the tokenizer can't encode (a character tokenizer lacks characters), or too short to
    score, are left out."""
    tokenized = []
    for context, endings, label in examples:
        try:
            context_tokens = tokenizer.encode(context)
            # the space that separates an ending from its context belongs to the ending
            ending_tokens = [tokenizer.encode(" " + ending) for ending in endings]
        except UserError:
            continue
        rows = [(context_tokens + ending)[-block_size:] for ending in ending_tokens]
        if min(map(len, rows)) < 2:
            continue
        # each ending's first token is predicted from the token before it
        starts = [max(len(row) - len(ending), 1)
                  for row, ending in zip(rows, ending_tokens, strict=True)]
        tokenized.append((rows, starts, label))
    return tokenized


@torch.no_grad()
def ending_losses(model, tokenized, batch_size, device):
    """The model's total loss over each ending's tokens, and their number: two tensors of
    (examples, 4). batch_size rows (four an example) go through the model at a time."""
    was_training = model.training
    model.eval()
    per_batch = max(batch_size // 4, 1)
    # a bar on the terminal of the process that prints (None: on a terminal only)
    quiet = True if dist.is_initialized() and dist.get_rank() > 0 else None
    totals, counts = [], []
    for first in tqdm(range(0, len(tokenized), per_batch), desc="hellaswag", unit="batch",
                      disable=quiet, leave=False):
        examples = tokenized[first:first + per_batch]
        rows = [row for example_rows, _, _ in examples for row in example_rows]
        starts = [start for _, example_starts, _ in examples for start in example_starts]
        width = max(map(len, rows))
        # padded at the end, where a causal model's earlier positions can't see it
        x = torch.zeros(len(rows), width, dtype=torch.long)
        # 1 where a token of an ending is predicted: the targets are x shifted by one
        scored = torch.zeros(len(rows), width - 1)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            x[i, :len(row)] = torch.tensor(row)
            scored[i, start - 1:len(row) - 1] = 1
        x, scored = x.to(device), scored.to(device)
        logits = model(x)[0][:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none") * scored
        totals.append(losses.sum(1).view(-1, 4).cpu())
        counts.append(scored.sum(1).view(-1, 4).cpu())
    model.train(was_training)
    return torch.cat(totals), torch.cat(counts)


def evaluate(model, tokenized, batch_size, device):
    """acc_norm and acc (see above) of the model on the tokenized examples. Under torchrun each
    process scores every world_size-th example and the counts are added up, so that every
    process returns the same numbers."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = tokenized[rank::world_size]
    totals, counts = ending_losses(model, mine, batch_size, device)
    labels = torch.tensor([label for _, _, label in mine])
    right = [((totals / counts).argmin(1) == labels).sum().item(),
             (totals.argmin(1) == labels).sum().item()]
    acc_norm, acc = (count / len(tokenized) for count in all_reduce(right))
    return {"acc_norm": acc_norm, "acc": acc}


def load(path, tokenizer, block_size):
    """The examples of path (HellaSwag's validation set for "default"), tokenized, and a line
    saying how many of them the tokenizer can score."""
    examples = read_examples(None if path == "default" else path)
    tokenized = tokenize(examples, tokenizer, block_size)
    if not tokenized:
        raise UserError(f"the tokenizer can't encode any of the {len(examples):,} HellaSwag "
                        "examples; train with --tokenizer gpt2 to score it")
    left_out = len(examples) - len(tokenized)
    note = f", {left_out:,} left out (characters the tokenizer lacks)" if left_out else ""
    print(f"hellaswag: {len(tokenized):,} examples{note}")
    return tokenized


def summary(scores):
    """The scores for a line of progress: empty without them."""
    if not scores:
        return ""
    return f", hellaswag acc_norm {scores['acc_norm']:.4f} (acc {scores['acc']:.4f})"
