"""Every stage with a model of its own (01 to 09; the stages built on 09 use its) against
reference shapes, the loss at initialisation, falling loss, causality, attention weights,
generation, and the progress line."""
import math
import time

import pytest
import torch

from conftest import CHAIN, POST_TRAINING, STAGES, attention_heads, build_model, load_stage
from shared.cli import parse_args
from shared.data import load_dataset

V = 65


def tiny_args(stage, *flags):
    """The flags of a small run of stage, parsed as its main() parses them; the GPT stages with
    their cpu recipe, in float32 and in one process."""
    flags = ["--batch-size", "8", "--block-size", "16", "--eval-iters", "4", "--seed", "0", *flags]
    if stage.__name__ in STAGES:
        return parse_args(flags, stage.STAGE, stage.__doc__, stage.hyperparameters)
    defaults = (stage.RECIPES["chat"] if stage.__name__ in POST_TRAINING
                else stage.flag_defaults("cpu"))
    args = parse_args(["--warmup-iters", "2", *flags], stage.STAGE, stage.__doc__, defaults,
                      stage.add_flags)
    args.dtype, args.world_size = "float32", 1
    return args


def examples(data, block_size):
    """A text's windows, one every 10 tokens, as the chat stages' examples: inputs and targets,
    every target learned."""
    starts = torch.arange(0, len(data) - block_size - 1, 10)
    windows = data[starts[:, None] + torch.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


def train(stage, model, train_data, val_data, args):
    """The stage's own train(), called as its main() calls it; the history of losses."""
    device = torch.device("cpu")
    if stage.__name__ in STAGES + ["05_gpt"]:
        history, _ = stage.train(model, train_data, val_data, args, device, 1.0)
        return history
    # stages 06 and on: an optimizer of their own, a first step and a checkpoint writer; 06 and
    # 07 no benchmark; the chat stages examples, not a text
    optimizer = stage.configure_optimizer(model, args)

    def no_checkpoint(step, history):
        return None

    if stage.__name__ in POST_TRAINING:
        train_data, val_data = (examples(data, args.block_size) for data in (train_data, val_data))
        history, *_ = stage.train(model, optimizer, train_data, val_data, args, device, 1.0, 0, [],
                                  no_checkpoint)
    else:
        history, *_ = stage.train(model, optimizer, train_data, val_data, args, device, 1.0, None,
                                  0, [], no_checkpoint)
    return history


def test_logits_shape(stage):
    model = build_model(stage, V)
    idx = torch.randint(V, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, V) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 11, V) and loss.shape == ()


@pytest.mark.parametrize("name", STAGES[1:])
def test_attention_output_shapes(name):
    stage = load_stage(name)
    model = build_model(stage, V, n_embd=24, n_head=3)
    x = torch.randn(2, 10, 24)
    heads = attention_heads(stage, model)
    assert heads, "this stage should have attention heads"
    for head in heads:
        head_size = head.key.out_features
        assert head(x).shape == (2, 10, head_size)
        assert head.attention_weights(x).shape == (2, 10, 10)
    if name == "02_single_head":
        assert heads[0].key.out_features == 24  # the one head is as wide as the model
    else:
        assert len(heads) == 3 * (2 if name == "04_block" else 1)
        assert all(head.key.out_features == 8 for head in heads)  # n_embd / n_head each
        attention = model.h[0].attn if name == "04_block" else model.attn
        assert attention(x).shape == (2, 10, 24)  # concatenated and projected back to n_embd
    if name == "04_block":
        assert model.h[0](x).shape == (2, 10, 24) and len(model.h) == 2


def test_initial_loss_is_near_uniform(stage, tokenizer, shakespeare):
    torch.manual_seed(0)
    model = build_model(stage, tokenizer.vocab_size).eval()
    data = torch.tensor(tokenizer.encode(shakespeare[:20_000]))
    x = torch.stack([data[i:i + 16] for i in range(0, 16_000, 500)])
    y = torch.stack([data[i + 1:i + 17] for i in range(0, 16_000, 500)])
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(tokenizer.vocab_size)) < 0.1


def test_loss_drops_after_a_few_dozen_steps(stage):
    args = tiny_args(stage, "--max-iters", "40", "--eval-interval", "40", "--lr", "3e-2")
    torch.manual_seed(0)
    tokenizer, train_data, val_data = load_dataset(block_size=args.block_size)
    model = build_model(stage, tokenizer.vocab_size, block_size=args.block_size)
    history = train(stage, model, train_data, val_data, args)
    assert [h["step"] for h in history] == [0, 40]
    assert history[0]["val"] - history[-1]["val"] > 0.5


def test_the_progress_line_charges_steps_and_evaluations_what_they_cost(stage, monkeypatch):
    """On a made-up clock. Step 200, its evaluation just made: 20 s since the line of step 100,
    of which 10 s that evaluation's, so 100 steps in 10 s; 3 evaluations of 10 s each so far.
    Left: 800 steps of 100 ms and 8 evaluations of 10 s, whatever came before (a stall, a slow
    start)."""
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    args = tiny_args(stage, "--max-iters", "1000", "--eval-interval", "100")
    line = stage.progress(200, args, (100, 980.0, 20.0), 30.0, 3)
    assert line == " | 100.0 ms/step, 1,280 tok/s, 0:02:40 left"
    assert stage.progress(200, args, (200, 1000.0, 30.0), 30.0, 3) == ""
    # step 1 of a run whose first evaluation took 105 s: 999 steps of 100 ms, and 4 evaluations
    # more (at 250, 500, 750, 1000), not 105 s again for each step
    args = tiny_args(stage, "--max-iters", "1000", "--eval-interval", "250")
    line = stage.progress(1, args, (0, 999.9, 105.0), 105.0, 1)
    assert line.endswith(" 0:08:40 left")
    # rounded before it is split: 3,599.96 s is an hour, not 59:60
    args = tiny_args(stage, "--max-iters", "360000", "--eval-interval", "1000000")
    assert stage.progress(4, args, (0, 999.96, 0.0), 0.0, 1).endswith(" 1:00:00 left")


def test_same_seed_same_losses(stage):
    args = tiny_args(stage, "--max-iters", "10", "--eval-interval", "5")
    tokenizer, train_data, val_data = load_dataset(block_size=args.block_size)
    runs = []
    for _ in range(2):
        torch.manual_seed(args.seed)
        model = build_model(stage, tokenizer.vocab_size, block_size=args.block_size)
        history = train(stage, model, train_data, val_data, args)
        runs.append([(h["train"], h["val"]) for h in history])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", CHAIN[1:])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(name):
    stage = load_stage(name)
    torch.manual_seed(0)
    model = build_model(stage, V).eval()
    idx = torch.randint(V, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert torch.equal(logits[:, :t], logits_changed[:, :t])
    assert not torch.allclose(logits[:, t:], logits_changed[:, t:])  # the change is seen from t on


@pytest.mark.parametrize("name", STAGES[1:])
def test_attention_weights_are_causal_and_normalised(name):
    stage = load_stage(name)
    torch.manual_seed(0)
    model = build_model(stage, V)
    x = torch.randn(2, 12, 24)
    for head in attention_heads(stage, model):
        weights = head.attention_weights(x)
        above_diagonal = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
        assert (weights[:, above_diagonal] == 0).all()
        assert (weights[:, ~above_diagonal] > 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 12))


@pytest.mark.parametrize("block_size,n_embd", [(5, 12), (23, 36)])
def test_generation_runs_past_the_block_size(stage, block_size, n_embd):
    model = build_model(stage, V, block_size=block_size, n_embd=n_embd)
    model.train()
    idx = torch.randint(V, (3, 2))
    out = stage.generate(model, idx, max_new_tokens=3 * block_size)
    assert out.shape == (3, 2 + 3 * block_size)
    assert torch.equal(out[:, :2], idx)
    assert out.min() >= 0 and out.max() < V
    assert model.training  # generate restores the mode it found
    model.eval()
    stage.generate(model, idx, max_new_tokens=2)
    assert not model.training


# the stages whose model or sampler is not the stage before's: 06's blocks and sampler are 05's and
# 09's 08's, character for character (tests/test_diffs.py holds them so), and their GPT's forward
# is the same too (06 adds loading GPT-2's weights, 09 LoRA's bookkeeping)
NEW_MODELS = [name for name in CHAIN if name not in ("06_train_for_real", "09_lora")]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_generation_samples_from_the_model(name):
    """A model that always predicts 'next = previous + 1' must generate a counting sequence."""
    stage = load_stage(name)
    model = build_model(stage, V, block_size=8)
    torch.manual_seed(0)
    data = torch.arange(4000) % V
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    for _ in range(300):
        ix = torch.randint(len(data) - 9, (32,))
        x = data[ix[:, None] + torch.arange(8)]  # (32, 8): 32 windows of 8
        _, loss = model(x, (x + 1) % V)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = stage.generate(model, torch.tensor([[3]]), max_new_tokens=20)[0]
    assert (torch.diff(out) % V == 1).float().mean() > 0.9
