"""Stage 05: GPT-2's architecture, its parameter counts, fused attention, the samplers and
the KV cache."""
import itertools
import json
import math
import re
import types

import pytest
import torch
from torch.nn import functional as F

from conftest import load_stage

gpt = load_stage("05_gpt")
V = 65
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--warmup-iters", "2", "--seed", "0"]


def tiny_model(vocab_size=V, block_size=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = gpt.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                           n_embd=32, dropout=dropout)
    return gpt.GPT(config)


def test_logits_and_loss_shapes():
    model = tiny_model()
    idx = torch.randint(V, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, V) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 11, V) and loss.shape == ()


def test_initial_loss_is_near_uniform():
    model = tiny_model().eval()
    idx = torch.randint(V, (8, 16))
    _, loss = model(idx, torch.randint(V, (8, 16)))
    assert abs(loss.item() - math.log(V)) < 0.1


def test_module_names_follow_gpt2():
    names = set(tiny_model().state_dict())
    for name in ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias",
                 "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight",
                 "h.0.ln_2.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.bias",
                 "h.1.mlp.c_proj.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"]:
        assert name in names


def test_weight_tying_shares_storage():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_residual_projections_are_scaled_at_init():
    config = gpt.GPTConfig(block_size=16, vocab_size=V, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = gpt.GPT(config)
    assert model.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.h[0].attn.c_proj.weight.std().item() == pytest.approx(
        0.02 / math.sqrt(16), rel=0.05)
    assert model.h[7].mlp.c_proj.weight.std().item() == pytest.approx(
        0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_parameter_counts_on_the_meta_device(name, count):
    with torch.device("meta"):  # shapes without memory: GPT-2 XL costs nothing to count
        model = gpt.GPT(gpt.PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == count  # the tied matrix once


def test_fused_attention_equals_the_explicit_masked_softmax():
    torch.manual_seed(0)
    attn = gpt.CausalSelfAttention(gpt.GPTConfig(n_head=4, n_embd=32), layer=0).eval()
    x = torch.randn(2, 10, 32)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    scores = q @ k.transpose(-2, -1) * 8 ** -0.5
    scores = scores.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.c_proj(y), atol=1e-6, rtol=1e-5)


def test_the_bfloat16_path_spells_out_the_same_attention():
    """Under CPU autocast attention runs as explicit bfloat16 products, not the fused kernel."""
    torch.manual_seed(0)
    attn = gpt.CausalSelfAttention(gpt.GPTConfig(n_head=4, n_embd=32), layer=0).eval()
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attn(x)
    torch.testing.assert_close(fast.float(), attn(x), atol=2e-2, rtol=2e-2)
    model = tiny_model().eval()
    idx = torch.randint(V, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % V
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(idx)[0][:, :9], model(changed)[0][:, :9])  # still causal


def test_queries_after_a_cache_see_every_earlier_key():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 7, 8)  # 3 new queries after 4 cached keys
    weights = gpt.causal_attention_weights(q, k)
    allowed = torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                            [1, 1, 1, 1, 1, 1, 0],
                            [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3))
    assert torch.equal(weights > 0, allowed.expand(2, 4, 3, 7))
    v = torch.randn(2, 4, 7, 8)
    torch.testing.assert_close(weights @ v,
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


def test_the_schedule_warms_up_then_decays_to_a_tenth():
    args = types.SimpleNamespace(lr=1.0, warmup_iters=10, max_iters=110)
    lrs = [gpt.learning_rate(step, args) for step in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # then only down
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)  # cosine: halfway, end


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decayed, plain = gpt.configure_optimizer(
        model, types.SimpleNamespace(lr=1e-3, weight_decay=0.1)).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert (all(p.dim() == 2 for p in decayed["params"])
            and all(p.dim() == 1 for p in plain["params"]))
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- samplers

def test_greedy_is_argmax():
    logits = torch.randn(5, V)
    assert torch.equal(gpt.greedy(logits), logits.argmax(-1, keepdim=True))
    assert torch.equal(gpt.sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    kept = gpt.top_k_filter(logits, 3)
    assert torch.isfinite(kept).sum() == 3
    assert kept[0, 1] == 3.0 and torch.isfinite(kept[0, 2:5]).sum() == 2
    assert torch.isfinite(gpt.top_k_filter(logits, 100)).all()  # k is clamped to the vocabulary
    probs = F.softmax(gpt.top_k_filter(torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]])), 2), dim=-1)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.0, 0.375, 0.0]]))


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    probs = lambda p: F.softmax(gpt.top_p_filter(logits, p), dim=-1)  # noqa: E731
    # 0.5 reaches p exactly
    torch.testing.assert_close(probs(0.5), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # 0.3 crosses 0.6
    torch.testing.assert_close(probs(0.6), torch.tensor([[0.0, 0.625, 0.375, 0.0]]))
    # a tie at 0.1: sort order
    torch.testing.assert_close(probs(0.85), torch.tensor([[1 / 9, 5 / 9, 3 / 9, 0.0]]))
    torch.testing.assert_close(probs(1e-9), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # never empty
    torch.testing.assert_close(probs(1.0), torch.tensor([[0.1, 0.5, 0.3, 0.1]]))


def test_sampled_tokens_stay_inside_the_top_k_set_and_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(1, V).repeat(4000, 1)
    allowed_k = set(logits[0].topk(5).indices.tolist())
    drawn = gpt.sample_next(logits, top_k=5)
    assert set(drawn.flatten().tolist()) == allowed_k  # inside, and all of it reached
    sorted_probs, order = F.softmax(logits[0], -1).sort(descending=True)
    nucleus_size = int((sorted_probs.cumsum(0) < 0.7).sum()) + 1
    drawn = gpt.sample_next(logits, top_p=0.7)
    assert set(drawn.flatten().tolist()) == set(order[:nucleus_size].tolist())


def test_extreme_temperatures_still_give_a_distribution():
    logits = torch.tensor([[2.0, 5.0, 1.0, 5.0 - 1e-3]]) * 100
    torch.manual_seed(0)
    # logits / T overflows in float32
    cold = gpt.sample_next(logits.repeat(200, 1), temperature=1e-300)
    assert set(cold.flatten().tolist()) == {1}  # greedy, in the limit
    hot = gpt.sample_next(logits.repeat(4000, 1), temperature=1e300)  # every logit / T rounds to 0
    assert set(hot.flatten().tolist()) == {0, 1, 2, 3}  # uniform, in the limit


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    model = tiny_model()
    idx = torch.randint(V, (3, 4))
    greedy = gpt.generate(model, idx, 20, temperature=0)
    assert torch.equal(gpt.generate(model, idx, 20, top_k=1), greedy)
    assert torch.equal(gpt.generate(model, idx, 20, top_p=1e-6), greedy)


def test_same_seed_same_samples():
    model = tiny_model()
    idx = torch.randint(V, (2, 4))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(gpt.generate(model, idx, 30, temperature=0.8, top_k=40, top_p=0.95))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("max_new_tokens", [10, 40])  # within the 16-token context, and past it
def test_kv_cache_equals_recomputation(max_new_tokens):
    model = tiny_model(dropout=0.1).train()
    idx = torch.randint(V, (3, 5))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        outs.append(gpt.generate(model, idx, max_new_tokens, use_cache=use_cache))
    assert outs[0].shape == (3, 5 + max_new_tokens)
    assert torch.equal(outs[0], outs[1])
    assert model.training  # generate restores the mode it found


def test_a_prompt_longer_than_the_context_and_zero_new_tokens():
    model = tiny_model()
    idx = torch.randint(V, (2, 40))  # 40 tokens, a 16-token context
    assert torch.equal(gpt.generate(model, idx, 0), idx)
    torch.manual_seed(0)
    cached = gpt.generate(model, idx, 5)
    torch.manual_seed(0)
    assert (torch.equal(cached, gpt.generate(model, idx, 5, use_cache=False))
            and cached.shape == (2, 45))


def test_cached_logits_match_a_full_forward_pass():
    model = tiny_model().eval()
    idx = torch.randint(V, (2, 12))
    cache = gpt.KVCache()
    logits_prefix, _ = model(idx[:, :7], cache=cache)
    steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 12)]
    full, _ = model(idx)
    torch.testing.assert_close(torch.cat([logits_prefix, *steps], dim=1), full,
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- tokenizers, the command line

def test_tiktoken_round_trip_on_tiny_shakespeare(shakespeare):
    from shared.tokenizer import TiktokenTokenizer
    tokenizer = TiktokenTokenizer("gpt2")
    ids = tokenizer.encode(shakespeare)
    assert tokenizer.vocab_size == 50_257 and len(ids) == 338_025
    assert tokenizer.decode(ids) == shakespeare


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_loss_drops_with_both_tokenizers(tokenizer, tmp_path):
    gpt.main([*TINY, "--tokenizer", tokenizer, "--max-iters", "30", "--eval-interval", "30",
              "--lr", "1e-2", "--max-new-tokens", "0", "--out", str(tmp_path)])
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    vocab = 65 if tokenizer == "char" else 50_257
    assert abs(history[0]["val"] - math.log(vocab)) < 0.1
    assert history[0]["val"] - history[-1]["val"] > 0.5
    if tokenizer == "char":  # one token per character: bits per char is the loss in bits
        assert history[-1]["val_bpc"] == pytest.approx(history[-1]["val"] / math.log(2))
    else:  # about 3.3 characters per GPT-2 token here
        assert 2.5 < history[-1]["val"] / math.log(2) / history[-1]["val_bpc"] < 4.5


def test_training_ends_with_a_sample_from_each_sampler(capsys):
    gpt.main([*TINY, "--max-iters", "6", "--eval-interval", "3", "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert re.search(r"^step 6: train loss \d\.\d{4}, val loss \d\.\d{4}, val \d\.\d{3} bits/char",
                     out, re.M)
    labels = re.findall(r"^-{30} (.+?) -+$", out, re.M)
    assert labels == ["greedy", "temperature 0.8", "top-k 40", "top-p 0.9"]
