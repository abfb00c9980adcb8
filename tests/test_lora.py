"""Stage 09: LoRA adapters against peft's, frozen bases, small checkpoints, merging and export."""
import argparse
import contextlib
import io
import json
import shutil

import peft
import pytest
import torch
import transformers

from conftest import build_model, load_stage, quick_flags, stage_error
from shared import device
from shared.hub import weights_digest
from test_chat import moved_copies, short_chats

lora = load_stage("09_lora")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    """A quick run of the stage, LoRA (rank 8 on every projection) on base, merged: its
    folder."""
    out = tmp_path_factory.mktemp("lora")
    with contextlib.redirect_stdout(io.StringIO()):
        lora.main([*quick_flags("09_lora", out, base), "--max-new-tokens", "5"])
        lora.main(["--merge", "--out", str(out)])
    return out


def settings(model, rank=4, alpha=8.0, targets=lora.TARGETS, first_new_row=None):
    return {"lora_rank": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "lora_targets": targets,
            "first_new_row": first_new_row or model.config.vocab_size, "base": "",
            "base_digest": weights_digest(model)}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_folder(request, tmp_path_factory, shakespeare):
    """A small random Llama (tied) or Qwen3 (QK-norm, untied), saved with a ChatML tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    return moved_copies(request.param, root, shakespeare[:20_000], [request.param])[0]


@pytest.mark.parametrize("targets", [lora.TARGETS, ["q_proj", "v_proj"]])
def test_the_adapters_compute_and_merge_as_peft_does(hf_folder, targets):
    torch.manual_seed(0)
    base = lora.GPT.from_pretrained(str(hf_folder)).eval()
    model = lora.add_lora(lora.GPT.from_pretrained(str(hf_folder)).eval(), settings(base, 4, 8.0,
                                                                                   targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B away from zero, so that the update shows
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                             init_lora_weights=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder)
    theirs = peft.get_peft_model(hf_model, config).eval()
    state = theirs.state_dict()
    copied = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                module, matrix = name.rsplit(".", 1)
                state[f"base_model.model.{lora.hugging_face_name(module)}.{matrix}.default.weight"
                      ].copy_(p)
                copied += 1
    assert copied == 2 * 2 * len(targets)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == theirs.get_nb_trainable_parameters()[0]
    x = torch.randint(320, (2, 24))
    with torch.no_grad():
        ours = model(x)[0]
        assert (ours - base(x)[0]).abs().max() > 1e-3  # the adapters change the output
        assert (ours - theirs(x).logits).abs().max() <= 1e-5
    merged = lora.merge(model).state_dict()
    plain = theirs.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, plain[lora.hugging_face_name(name)])


def test_with_b_at_zero_the_model_is_its_base():
    torch.manual_seed(0)
    base = build_model(lora, 69, dropout=0.0).eval()
    model = lora.add_lora(build_model(lora, 69, dropout=0.0).eval(), settings(base))
    model.load_state_dict(base.state_dict(), strict=False)
    x = torch.randint(69, (2, 16))
    assert torch.equal(model(x)[0], base(x)[0])


def test_only_the_adapters_and_the_new_rows_train_and_the_base_stays_bit_identical():
    torch.manual_seed(0)
    model = build_model(lora, 69, dropout=0.0)  # tied: one table for the embedding and the head
    model = lora.add_lora(model, settings(model, first_new_row=65))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x, y = torch.randint(69, (4, 16)), torch.randint(69, (4, 16))
    model(x, y)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name or name in lora.TABLES), name
    model.zero_grad()
    args = argparse.Namespace(lr=1e-2, weight_decay=0.1, warmup_iters=1, max_iters=10,
                              grad_clip=1.0, dtype="float32")
    optimizer = lora.configure_optimizer(model, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        lora.train_step(model, optimizer, [(x, y)], args, step, scaler)
    for name, tensor in model.state_dict().items():
        if "lora_B" in name or name in lora.TABLES:
            assert not torch.equal(tensor[-4:], before[name][-4:]), name
        if "lora_" not in name:
            assert torch.equal(tensor[:65], before[name][:65]), name
    assert set(lora.adapter_state(model)) == {n for n in before if "lora_" in n} | {"wte.weight"}
    assert lora.adapter_state(model)["wte.weight"].shape == (4, 24)


def test_the_memory_estimate_counts_a_gradient_and_two_moments_for_trained_weights_only():
    model = build_model(lora, 69, n_embd=64, n_head=4, dropout=0.0)
    full = device.training_memory(model, 4, 16)
    frozen = sum(p.numel() * 4 for p in model.parameters())
    lora.add_lora(model, settings(model, rank=1))
    adapters = sum(p.numel() * 4 for name, p in model.named_parameters() if "lora_" in name)
    # every weight is kept, but no gradient or moments for the frozen ones (nor the inputs that
    # their gradients would need)
    assert frozen + 4 * adapters < device.training_memory(model, 4, 16) < full - 2 * frozen
    assert adapters < frozen / 10


def test_a_checkpoint_holds_the_adapters_and_merging_gives_stage_08_the_same_model(
        trained, base, capsys):
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    assert all("lora_" in name or name in lora.TABLES for name in checkpoint["model"])
    assert checkpoint["model"]["lm_head.weight"].shape[0] == 4  # the template's rows alone
    weights = torch.load(base / "ckpt.pt", weights_only=True)["model"]
    # r (in + out) a matrix, and the 4 new rows of the embedding and of the head
    expected = sum(8 * sum(t.shape) for name, t in weights.items()
                   if name.split(".")[-2] in lora.TARGETS) + 2 * 4 * weights["wte.weight"].size(1)
    assert sum(t.numel() for t in checkpoint["model"].values()) == expected
    model, template = lora.load_model(trained)
    chat = load_stage("08_chat")
    merged, _ = chat.load_model(trained / "merged")
    # the merged model alone: nothing to resume
    assert set(torch.load(trained / "merged" / "ckpt.pt", weights_only=True)) == {
        "stage", "model", "config", "tokenizer"}
    x = torch.randint(69, (2, 16))
    with torch.no_grad():
        assert (model.eval()(x)[0] - merged.eval()(x)[0]).abs().max() <= 1e-5
    greedy = ["--prompt", "Good morrow.", "--max-new-tokens", "20", "--temperature", "0"]
    lora.main(["--sample", "--out", str(trained), *greedy])
    adapted = capsys.readouterr().out
    chat.main(["--sample", "--out", str(trained / "merged"), *greedy])
    assert capsys.readouterr().out == adapted and "reply" in adapted
    assert "already; replace it with --overwrite" in stage_error(capsys, lora.main, "--merge",
                                                                 "--out", str(trained))


def test_adapters_on_another_base_or_as_a_base_are_refused(trained, base, tmp_path, capsys):
    altered = tmp_path / "base"
    shutil.copytree(base, altered)
    base = torch.load(altered / "ckpt.pt", weights_only=True)
    base["model"]["h.0.attn.q_proj.weight"][0, 0] += 1e-3
    torch.save(base, altered / "ckpt.pt")
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    checkpoint["lora"]["base"] = str(altered)
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "ckpt.pt")
    message = stage_error(capsys, lora.main, "--sample", "--prompt", "Hi", "--out",
                          str(tmp_path / "run"))
    assert "were trained on another" in message and "its weights have changed" in message
    message = stage_error(capsys, lora.main, "--init-from", str(trained), "--out",
                          str(tmp_path / "again"))
    assert "holds adapters, not a model" in message and "--merge" in message


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "33"], "--lora-rank 33 is more than h.0.attn.q_proj (32 x 32) can take"),
    (["--lora-rank", "-1"], "must be 0 or more, got -1"),
    (["--lora-alpha", "0"], "must be above 0, got 0"),
    (["--lora-dropout", "1"], "must be at least 0 and below 1"),
    (["--lora-targets", "lm_head"], "invalid choice: 'lm_head'"),
])
def test_bad_lora_settings_get_one_sentence(base, tmp_path, capsys, flags, message):
    assert message in stage_error(capsys, lora.main, *quick_flags("09_lora", tmp_path, base),
                                  *flags)


def test_rank_0_is_stage_08_and_adapters_go_on_a_run_of_stage_08(base, tmp_path):
    histories = []
    for name, flags in (("08_chat", []), ("09_lora", ["--lora-rank", "0"])):
        out = tmp_path / name
        with contextlib.redirect_stdout(io.StringIO()):
            load_stage(name).main([*quick_flags(name, out, base), *flags])
        histories.append([(h["step"], h["train"], h["val"])
                          for h in json.loads((out / "metrics.json").read_text())["history"]])
    assert histories[0] == histories[1] and len(histories[0]) == 3
    # adapters on the model that stage 08 fine-tuned
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        lora.main([*quick_flags("09_lora", tmp_path / "on_08", tmp_path / "08_chat")])
    assert "of them trained" in printed.getvalue()
    checkpoint = torch.load(tmp_path / "on_08" / "ckpt.pt", weights_only=True)
    assert checkpoint["lora"]["base"] == str(tmp_path / "08_chat")


def test_fine_tune_a_hugging_face_model_merge_and_export_it(hf_folder, tmp_path, capsys):
    data = short_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    lora.main(["--init-from", str(hf_folder), "--data", data, "--block-size", "64",
               "--batch-size", "8", "--max-iters", "10", "--eval-interval", "10",
               "--eval-iters", "2", "--lr", "1e-2", "--max-new-tokens", "0", "--out", str(out)])
    losses = [float(line.split("val loss ")[1].split(",")[0])
              for line in capsys.readouterr().out.splitlines() if "val loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]
    lora.main(["--merge", "--out", str(out)])
    model, _ = lora.load_model(out)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    x = torch.randint(320, (2, 24))
    with torch.no_grad():
        ours = model.eval()(x)[0]
        assert (ours - exported(x).logits).abs().max() <= 1e-5
        assert (ours - original(x).logits).abs().max() > 1e-4  # fine-tuning changed it
    assert transformers.AutoTokenizer.from_pretrained(out / "merged").chat_template
