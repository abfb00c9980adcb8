"""Stage 07: rotary positions, RMSNorm, SwiGLU, grouped-query attention, QK-norm, Muon, the sliding
KV cache, and Llama and Qwen3 weights through transformers against Hugging Face's own outputs,
all offline: small models with random weights stand in for the real ones."""

import pytest
import torch
from torch.nn import functional as F

from conftest import altered_copy, assert_same_state, fine_tune_then_sample, load_stage, stage_error

modern = load_stage("07_modern")
V = 65
TINY = ["--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "32",
        "--block-size", "16", "--batch-size", "4", "--eval-iters", "2", "--warmup-iters", "2",
        "--seed", "0", "--max-new-tokens", "0"]


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    config = modern.GPTConfig(**{**dict(block_size=16, vocab_size=V, n_layer=2, n_head=4,
                                        n_kv_head=2, n_embd=32), **changes})
    return modern.GPT(config)


def test_the_modern_parts_are_where_they_should_be():
    model = tiny_model(qk_norm=True, tie_embeddings=False)
    assert not hasattr(model, "wpe")  # positions come from rotating queries and keys
    assert all(type(m) is torch.nn.RMSNorm
               for m in (model.ln_f, model.h[0].ln_1, model.h[1].attn.q_norm))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    # no biases
    assert not any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in model.modules())
    assert (model.h[0].attn.q_proj.weight.shape == (4 * 8, 32)
            and model.h[0].attn.k_proj.weight.shape == (2 * 8, 32))
    # 8/3, up to 64s
    assert model.h[0].mlp.gate_proj.weight.shape == model.h[0].mlp.up_proj.weight.shape == (128, 32)
    assert model.lm_head.weight is not model.wte.weight
    tied = tiny_model()
    assert tied.lm_head.weight is tied.wte.weight



@pytest.mark.parametrize("tie", [False, True])
def test_a_model_to_load_draws_no_random_weights_and_keeps_its_tie(tie):
    """GPT.empty, what a Hugging Face model's weights are copied into: its weights are those of
    GPT(config), in shape and tie, but not filled with random numbers (most of the time of
    loading a large model), so that the random state is left as it was."""
    built = tiny_model(tie_embeddings=tie)
    state = torch.random.get_rng_state()
    empty = modern.GPT.empty(built.config)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (empty.lm_head.weight is empty.wte.weight) == tie
    shapes = [(name, p.shape, p.device) for name, p in empty.named_parameters()]
    assert shapes == [(name, p.shape, p.device) for name, p in built.named_parameters()]

def test_rotary_positions_make_attention_scores_relative():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def turned(x, position):
        return modern.rotate(x, modern.rope_table(torch.tensor([position]), 16, 10000.0))

    def score(query_position, key_position):
        return (turned(q, query_position) * turned(k, key_position)).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)  # three apart, wherever
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    # position 0: no turn
    torch.testing.assert_close(turned(q, 0), q)
    assert turned(q, 7).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_the_rope_table_turns_each_pair_of_channels_by_its_own_frequency():
    """Channels i and i + head_dim/2 of a head at position p turn by p / theta^(2i / head_dim),
    checked one pair at a time against the plain formula of a 2-D rotation."""
    head_dim, theta, positions = 8, 500.0, torch.tensor([0, 3, 41])
    x = torch.randn(1, 2, 3, head_dim)
    turned = modern.rotate(x, modern.rope_table(positions, head_dim, theta))
    for i in range(head_dim // 2):
        angle = positions.double() / theta ** (2 * i / head_dim)
        a, b = x[..., i].double(), x[..., i + head_dim // 2].double()
        torch.testing.assert_close(turned[..., i], (a * angle.cos() - b * angle.sin()).float())
        torch.testing.assert_close(turned[..., i + head_dim // 2],
                                   (b * angle.cos() + a * angle.sin()).float())


def test_swiglu_is_a_gated_mlp():
    mlp = tiny_model().h[0].mlp
    torch.nn.init.normal_(mlp.down_proj.weight)  # zero at init
    x = torch.randn(2, 3, 32)
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    torch.testing.assert_close(mlp(x), (F.silu(gate) * up) @ mlp.down_proj.weight.T)


def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads():
    torch.manual_seed(0)
    attention = tiny_model(qk_norm=True).h[0].attn.eval()
    torch.nn.init.normal_(attention.o_proj.weight)  # zero at init
    x = torch.randn(2, 10, 32)
    rope = modern.rope_table(torch.arange(10), 8, 10000.0)
    q, k, v = attention.heads(x, rope)
    assert q.shape == (2, 4, 10, 8) and k.shape == v.shape == (2, 2, 10, 8)
    # query heads 0, 1 share key head 0; 2, 3 head 1
    k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 32)
    expected = attention.o_proj(y)
    torch.testing.assert_close(attention(x, rope), expected, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the explicit bfloat16 path, same attention
        fast = attention(x, rope)
    torch.testing.assert_close(fast.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("max_new_tokens", [10, 50])  # inside the 16-token window, and far past it
def test_the_sliding_kv_cache_equals_recomputation(max_new_tokens):
    model = tiny_model(dropout=0.1, qk_norm=True).train()
    idx = torch.randint(V, (3, 5))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        outs.append(modern.generate(model, idx, max_new_tokens, use_cache=use_cache))
    assert outs[0].shape == (3, 5 + max_new_tokens) and torch.equal(outs[0], outs[1])
    assert model.training


def test_the_cache_keeps_only_the_window_and_never_recomputes():
    model = tiny_model().eval()
    cache, calls = modern.KVCache(model.block_size, len(model.h)), []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].size(1)))
    idx = torch.randint(V, (1, 40))
    logits, _ = model(idx[:, :30], cache=cache)  # a prompt longer than the window
    for t in range(30, 40):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
    assert calls == [30] + [1] * 10 and cache.position == 40
    assert all(k.size(2) == model.block_size - 1 for k in cache.keys.values())
    full, _ = model(idx)  # every position in its own window of 16
    torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model(tie_embeddings=False)
    # zero at init, which would leave the matrices before them without a gradient
    for block in model.h:
        torch.nn.init.normal_(block.attn.o_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.down_proj.weight, std=0.02)
    optimizer = modern.configure_optimizer(model, type("Args", (), dict(lr=1e-3, weight_decay=0.1)))
    muon, adamw = optimizer.optimizers
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_muon) == (name.startswith("h.") and p.dim() == 2), name
    assert {g["weight_decay"] for g in adamw.param_groups} == {0.1, 0.0}
    x = torch.randint(V, (2, 16))
    model(x, x)[1].backward()
    before = [p.clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    state = optimizer.state_dict()
    again = modern.configure_optimizer(model, type("Args", (), dict(lr=1e-3, weight_decay=0.1)))
    again.load_state_dict(state)
    assert_same_state(again.state_dict(), state)


@pytest.mark.parametrize("config,count", [
    (dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, hidden_dim=1536),
     134_515_008),
    (dict(vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, head_dim=128,
          hidden_dim=3072, qk_norm=True), 596_049_920),
], ids=["SmolLM2-135M", "Qwen3-0.6B"])
def test_parameter_counts_of_real_models_on_the_meta_device(config, count):
    with torch.device("meta"):
        model = modern.GPT(modern.GPTConfig(**config))
    assert sum(p.numel() for p in model.parameters()) == count


def test_heads_must_share_key_value_heads_evenly(capsys):
    assert "--n-head 4 must be divisible by --n-kv-head 3" in stage_error(
        capsys, modern.main, "--n-kv-head", "3")


def test_heads_must_have_an_even_width_to_rotate(capsys):
    assert "heads of 3 channels, an odd number" in stage_error(
        capsys, modern.main, "--n-embd", "12", "--n-head", "4")


# -------------------------------------------------------------------------- Llama and Qwen3 weights

transformers = pytest.importorskip("transformers")


def tokenizer_for_tests(text):
    """A byte-level BPE of 300 tokens trained here on the text, as Hugging Face tokenizers
    save them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                eos_token="<|endoftext|>")


MODELS = {  # every weight random, so a missed transpose, norm or head would show
    "llama GQA, tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False)),
    "qwen3 QK-norm, head_dim 16 in a width of 32": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, max_position_embeddings=64,
                                 tie_word_embeddings=False)),
    "qwen3 tied": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
        tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=MODELS)
def hf_folder(request, tmp_path_factory, shakespeare):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    # Hugging Face's generate would stop at one; ours runs on
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norm gains away from 1
    folder = tmp_path_factory.mktemp("hf") / request.param.split()[0]
    model.save_pretrained(folder)
    tokenizer_for_tests(shakespeare[:50_000]).save_pretrained(folder)
    return folder, model


def test_loaded_weights_give_hugging_faces_logits_and_greedy_tokens(hf_folder):
    folder, hf_model = hf_folder
    model = modern.GPT.from_pretrained(folder).eval()
    assert model.config.n_kv_head == hf_model.config.num_key_value_heads
    assert (model.lm_head.weight is model.wte.weight) == hf_model.config.tie_word_embeddings
    idx = torch.randint(320, (3, 40))
    with torch.no_grad():
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() <= 1e-4
    prompt = torch.randint(320, (2, 6))
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(modern.generate(model, prompt, 20, temperature=0), theirs)


@pytest.mark.parametrize("hf_folder",
                         ["llama GQA, tied", "qwen3 QK-norm, head_dim 16 in a width of 32"],
                         indirect=True)
def test_fine_tune_a_loaded_model_with_its_own_tokenizer_then_sample(hf_folder, tmp_path, capsys):
    checkpoint = fine_tune_then_sample(modern, hf_folder[0], tmp_path, capsys, steps=6)
    assert checkpoint["tokenizer"] == {"kind": "huggingface", "name": str(hf_folder[0])}


def test_a_model_of_another_type_is_refused(capsys, tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    message = stage_error(capsys, modern.main, "--init-from", str(tmp_path / "gpt2"), "--sample",
                          "--out", str(tmp_path))
    assert "is a gpt2 model; this stage loads llama and qwen3 models" in message


@pytest.mark.parametrize("how,message", [
    ("missing", "1 missing (such as model.layers.0."),
    ("unexpected", "1 of no use (such as extra.weight)"),
    ("reshaped", "1 of another shape (such as model.layers.0."),
])
@pytest.mark.parametrize("hf_folder", ["qwen3 tied"], indirect=True)
def test_weights_that_do_not_all_load_are_refused(hf_folder, capsys, tmp_path, how, message):
    folder = altered_copy(hf_folder[0], tmp_path / "altered", how)
    error = stage_error(capsys, modern.main, "--init-from", str(folder), "--sample",
                        "--out", str(tmp_path))
    assert "does not hold the weights its config describes" in error and message in error


@pytest.mark.parametrize("change,message", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}), "scales its RoPE (llama3)"),
    (dict(attention_bias=True), "has biases in its attention or MLP"),
    (dict(mlp_bias=True), "has biases in its attention or MLP"),
    (dict(hidden_act="gelu"), "gates its MLP with gelu, not SiLU"),
], ids=["llama3 RoPE", "attention bias", "MLP bias", "GELU"])
def test_other_llama_variants_are_refused_in_one_sentence(capsys, tmp_path, change, message):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, **change)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    assert message in stage_error(capsys, modern.main, "--init-from", str(tmp_path / "model"),
                                  "--sample", "--out", str(tmp_path))


def test_sliding_windows_and_mixtures_of_experts_are_refused(capsys, tmp_path):
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=8)).save_pretrained(tmp_path / "sliding")
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2,
    )).save_pretrained(tmp_path / "moe")
    for name, cause in [("sliding", "has sliding-window attention"),
                        ("moe", "is a qwen3_moe model; this stage loads llama and qwen3 models")]:
        message = stage_error(capsys, modern.main, "--init-from", str(tmp_path / name), "--sample",
                              "--out", str(tmp_path))
        assert cause in message


def test_a_model_needs_its_own_tokenizer(capsys, hf_folder, tmp_path):
    assert "its own tokenizer" in stage_error(capsys, modern.main, "--init-from", str(hf_folder[0]),
                                              "--tokenizer", "char", "--out", str(tmp_path))


def test_token_ids_beyond_the_models_vocabulary_are_refused(capsys, shakespeare, tmp_path):
    """A folder whose tokenizer (300 tokens) outgrew its model's embedding (64 rows)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    tokenizer_for_tests(shakespeare[:50_000]).save_pretrained(tmp_path / "small")
    message = stage_error(capsys, modern.main, "--init-from", str(tmp_path / "small"), "--sample",
                          "--prompt", "What say you, my lord?", "--out", str(tmp_path / "out"))
    assert "has a vocabulary of 64 tokens: use the tokenizer it was trained with" in message


@pytest.mark.parametrize("hf_folder", ["llama GQA, tied"], indirect=True)
def test_the_context_can_be_shortened_but_not_lengthened(capsys, hf_folder, tmp_path):
    folder, hf_model = hf_folder
    model = modern.GPT.from_pretrained(folder, block_size=16).eval()
    assert model.block_size == 16 and model.config.vocab_size == 320
    idx = torch.randint(320, (2, 16))
    with torch.no_grad():  # no position table to crop: the same logits within the context
        assert (model(idx)[0] - hf_model(idx).logits).abs().max().item() <= 1e-4
    assert "longer than" in stage_error(capsys, modern.main, "--init-from", str(folder),
                                        "--block-size", "128", "--out", str(tmp_path))
