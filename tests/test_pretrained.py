"""Stage 06 with GPT-2's weights through Hugging Face transformers, all offline: a small GPT-2 with
random weights stands in for OpenAI's, saved and loaded the way a downloaded one would be."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, altered_copy, fine_tune_then_sample, load_stage, stage_error

transformers = pytest.importorskip("transformers")
gpt = load_stage("06_train_for_real")


def test_loaded_weights_give_hugging_faces_logits(hf_model_folder):
    folder, hf_model = hf_model_folder
    model = gpt.GPT.from_pretrained(folder)
    assert (model.config.block_size == 32 and model.config.n_layer == 2
            and model.config.vocab_size == 50_257)
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(50_257, (3, 32))
    with torch.no_grad():
        ours, _ = model.eval()(idx)
        theirs = hf_model(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_matches_hugging_faces_generate(hf_model_folder):
    folder, hf_model = hf_model_folder
    model = gpt.GPT.from_pretrained(folder)
    prompt = torch.randint(50_257, (2, 6))
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(gpt.generate(model, prompt, 20, temperature=0), theirs)


def test_cropping_the_context_keeps_the_first_positions(hf_model_folder):
    folder, hf_model = hf_model_folder
    model = gpt.GPT.from_pretrained(folder, block_size=16)
    assert model.block_size == 16 and model.wpe.weight.shape == (16, 32)
    idx = torch.randint(50_257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], hf_model(idx).logits, atol=1e-4, rtol=0)


def test_fine_tune_from_loaded_weights_then_sample(hf_model_folder, tmp_path, capsys):
    checkpoint = fine_tune_then_sample(gpt, hf_model_folder[0], tmp_path, capsys, steps=10)
    assert (checkpoint["config"]["block_size"] == 16
            and checkpoint["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"})


@pytest.mark.parametrize("flags,message", [
    (["--block-size", "64"], "longer than"),
    (["--tokenizer", "char"], "--tokenizer gpt2"),
])
def test_bad_pretrained_flags_get_one_sentence(hf_model_folder, capsys, tmp_path, flags, message):
    assert message in stage_error(capsys, gpt.main, "--init-from", str(hf_model_folder[0]), *flags,
                                  "--max-iters", "1", "--out", str(tmp_path))


def test_offline_without_a_local_folder_gets_one_sentence(tmp_path):
    # a fresh process, as the hub library reads these variables when it is first imported
    result = subprocess.run([sys.executable, "06_train_for_real.py", "--init-from", "gpt2",
                             "--sample", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2 and "could not load 'gpt2'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_transformers_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(gpt.UserError, match="pip install transformers"):
        gpt.GPT.from_pretrained("gpt2")


def test_a_model_of_another_type_is_refused(capsys, tmp_path):
    """transformers would build a GPT-2 from a Llama's config, with random weights."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    message = stage_error(capsys, gpt.main, "--init-from", str(tmp_path / "llama"), "--sample",
                          "--prompt", "ROMEO:", "--out", str(tmp_path))
    assert "is a llama model; this stage loads gpt2 models" in message


@pytest.mark.parametrize("how,message", [("missing", "1 missing (such as "),
                                         ("unexpected", "1 of no use (such as extra.weight)"),
                                         ("reshaped", "1 of another shape (such as ")])
def test_weights_that_do_not_all_load_are_refused(hf_model_folder, capsys, tmp_path, how,
                                                  message):
    folder = altered_copy(hf_model_folder[0], tmp_path / "altered", how)
    error = stage_error(capsys, gpt.main, "--init-from", str(folder), "--sample",
                        "--out", str(tmp_path))
    assert "does not hold the weights its config describes" in error and message in error


@pytest.mark.parametrize("flags", [["--sample", "--prompt", "ROMEO:"], ["--max-iters", "1"]])
def test_token_ids_beyond_the_models_vocabulary_are_refused(capsys, tmp_path, flags):
    """A GPT-2 of 1,000 tokens has no embedding for most of what GPT-2's tokenizer makes."""
    config = transformers.GPT2Config(vocab_size=1000, n_positions=32, n_embd=32, n_layer=1,
                                     n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "small")
    (tmp_path / "text.txt").write_text("ROMEO: But soft, what light through yonder window breaks?\n"
                                       * 40)
    message = stage_error(capsys, gpt.main, "--init-from", str(tmp_path / "small"), *flags,
                          "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out"))
    assert "but " + str(tmp_path / "small") + " has a vocabulary of 1000 tokens" in message


@pytest.mark.parametrize("flag", ["--init-from", "--tokenizer"])
def test_a_hub_that_cannot_be_reached_is_said_at_once(capsys, monkeypatch, tmp_path, flag):
    """Offline, transformers retries every file for half a minute before giving up; asked once
    with a short timeout, the hub's absence is one sentence within seconds. (A closed port here
    stands in for the hub, so that the test is the same with or without a network.)"""
    import time

    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.time()
    message = stage_error(capsys, gpt.main, flag, "someone/some-model", "--out", str(tmp_path))
    assert time.time() - start < 5
    assert ("'someone/some-model': it is not a folder, not in the Hugging Face cache, and "
            "http://127.0.0.1:9 cannot be reached; download it once on a network") in message


def test_the_context_defaults_to_the_pretrained_models_own(hf_model_folder, tmp_path):
    """Its 32 tokens here, not the 1,024 of --block-size's default (GPT-2's context, and the
    most a fine-tuning step takes by default)."""
    gpt.main(["--init-from", str(hf_model_folder[0]), "--batch-size", "2", "--max-iters", "1",
              "--eval-iters", "1", "--max-new-tokens", "0", "--out", str(tmp_path)])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["block_size"] == 32
