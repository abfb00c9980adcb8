"""Stage 08: the chat template, the loss on the replies only, generation that stops, --chat."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch
from torch.nn import functional as F

from conftest import QUICK, ROOT, SMALL_BATCH, build_model, load_stage, quick_flags, stage_error
from shared import UserError
from shared.cli import run
from shared.conversations import HuggingFaceChat
from shared.tokenizer import CharTokenizer, HuggingFaceTokenizer

chat = load_stage("08_chat")

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who's there?"},
                {"role": "assistant", "content": "Nay, answer me."},
                {"role": "user", "content": "Long live the king!"},
                {"role": "assistant", "content": "Bernardo?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    """A quick run of the stage, as quick_runs makes it, for the tests that talk to it: its folder
    and what it printed."""
    out = tmp_path_factory.mktemp("chat")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        chat.main([*quick_flags("08_chat", out, base), "--max-new-tokens", "40"])
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def template(shakespeare):
    return chat.ChatTemplate(CharTokenizer(shakespeare))


def learned_tokens(ids, learned):
    return [token for token, keep in zip(ids, learned, strict=True) if keep]


def test_the_learned_tokens_are_the_replies_and_their_end_tokens(template):
    ids, learned = template.render(CONVERSATION)
    encode = template.tokenizer.encode
    assert learned_tokens(ids, learned) == [*encode("Nay, answer me."), template.end,
                                            *encode("Bernardo?"), template.end]
    assert ids[:3] == [template.ids["<|system|>"], *encode("Be")]
    prompt, _ = template.render(CONVERSATION[:2], reply_next=True)
    assert prompt == ids[:len(prompt)] and prompt[-1] == template.ids["<|assistant|>"]
    assert template.decode(ids) == "".join(m["content"] for m in CONVERSATION)


def test_new_rows_are_the_mean_of_the_old_and_leave_the_old_logits_as_they_were(template):
    torch.manual_seed(0)
    model = build_model(chat, template.tokenizer.vocab_size).eval()
    grown = chat.grow_vocabulary(model, template.vocab_size).eval()
    for name in ("wte.weight", "lm_head.weight"):
        old, new = model.state_dict()[name], grown.state_dict()[name]
        assert torch.equal(new[:len(old)], old)
        assert torch.allclose(new[len(old):], old.mean(dim=0).expand(4, -1))
    x = torch.randint(template.tokenizer.vocab_size, (2, 12))
    assert torch.equal(grown(x)[0][..., :len(old)], model(x)[0])
    assert chat.grow_vocabulary(grown, template.vocab_size) is grown


def test_the_loss_is_cross_entropy_over_the_learned_positions_alone(template):
    torch.manual_seed(0)
    model = build_model(chat, template.vocab_size, block_size=80)
    (inputs, targets), _, _ = chat.fit(template, [CONVERSATION], 80)
    logits, loss = model(inputs, targets)
    logits.retain_grad()
    loss.backward()
    keep = targets != -1
    assert keep.sum() == len("Nay, answer me.") + len("Bernardo?") + 2
    assert torch.allclose(loss, F.cross_entropy(logits[keep], targets[keep]))
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep] != 0).any()
    # a batch with nothing to learn: 0, not NaN, and no gradient
    model.zero_grad()
    _, loss = model(inputs, torch.full_like(targets, -1))
    loss.backward()
    assert loss.item() == 0 and all((p.grad == 0).all() for p in model.parameters())


def test_a_conversation_longer_than_the_context_is_cut_after_a_reply_or_dropped(template):
    # an example is block_size + 1 tokens: the inputs and, one later, the targets
    whole = len(template.render(CONVERSATION)[0])
    ids, learned = template.render(CONVERSATION[:3])
    _, cut, dropped = chat.fit(template, [CONVERSATION], whole - 1)
    assert (cut, dropped) == (0, 0)
    (inputs, targets), cut, dropped = chat.fit(template, [CONVERSATION] * 2, whole - 2)
    assert (len(inputs), cut, dropped) == (2, 2, 0)
    # cut after the first reply, its end token the last target; padding learns nothing
    assert targets[0, :len(ids) - 1].tolist() == [token if keep else -1 for token, keep in
                                                  zip(ids[1:], learned[1:], strict=True)]
    assert targets[0, len(ids) - 2] == template.end and (targets[0, len(ids) - 1:] == -1).all()
    assert inputs[0, :len(ids) - 1].tolist() == ids[:-1]
    _, cut, dropped = chat.fit(template, [CONVERSATION, CONVERSATION[:3]], len(ids) - 2)
    assert (cut, dropped) == (0, 2)


def test_generation_stops_row_by_row_at_the_end_of_turn():
    torch.manual_seed(0)
    model = build_model(chat, 3, block_size=8)
    prompt = torch.zeros(6, 2, dtype=torch.long)
    torch.manual_seed(1)
    free = chat.generate(model, prompt, 30)
    torch.manual_seed(1)
    stopped = chat.generate(model, prompt, 30, stop=2)
    first_stops = []
    for row, full in zip(stopped[:, 2:].tolist(), free[:, 2:].tolist(), strict=True):
        end = row.index(2)
        first_stops.append(end)
        assert row[:end + 1] == full[:end + 1] and set(row[end:]) == {2}
    # the rows stop at different tokens, and generation ends with the last of them
    assert len(set(first_stops)) > 1 and stopped.size(1) == 2 + max(first_stops) + 1 < 32


def chat_with(stage_main, out, lines, monkeypatch, capsys, *flags):
    """--chat with lines as its standard input; what it printed."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    stage_main(["--chat", "--out", str(out), "--temperature", "0", *flags])
    return capsys.readouterr().out


def test_chat_keeps_the_history_and_feeds_only_the_new_tokens(trained, monkeypatch, capsys):
    folder, _ = trained
    calls = []
    stream = chat.stream

    def recording(model, new_ids, cache, stop, args):
        call = {"new": list(new_ids), "position": cache.position, "cache": cache, "reply": []}
        calls.append(call)
        for token in stream(model, new_ids, cache, stop, args):
            call["reply"].append(token)
            yield token

    monkeypatch.setattr(chat, "stream", recording)
    printed = chat_with(chat.main, folder, ["Good morrow.", "What news?", "/quit",
                                                      "never read"], monkeypatch, capsys,
                        "--max-new-tokens", "8")
    assert len(calls) == 2 and printed.count("> ") == 3
    first, second = calls
    template = chat.ChatTemplate(CharTokenizer(json.loads(
        (folder / "metrics.json").read_text())["tokenizer"]["chars"]))
    history = [{"role": "user", "content": "Good morrow."},
               {"role": "assistant", "content": template.decode(first["reply"])},
               {"role": "user", "content": "What news?"}]
    ids, _ = template.render(history, reply_next=True)
    # the second turn goes on in the same cache, fed only what it has not seen
    fed = len(first["new"]) + len(first["reply"]) - 1
    assert second["cache"] is first["cache"] and second["position"] == fed
    assert first["new"] + first["reply"][:-1] + second["new"] == ids
    assert template.decode(first["reply"]) in printed


def test_chat_reads_a_pipe(trained):
    folder, _ = trained
    result = subprocess.run([sys.executable, "08_chat.py", "--chat", "--out", str(folder),
                             "--max-new-tokens", "5"], cwd=ROOT,
                            input="Good morrow.\nAnd you?\n", capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("Talk to the model") and result.stdout.count("> ") == 3


def test_chat_prints_whole_characters_and_a_ctrl_c_stops_only_the_reply(shakespeare, tmp_path,
                                                                        monkeypatch, capsys):
    """A reply streamed a byte-level token at a time: "é" is two tokens, printed once whole. A
    Ctrl-C in the second reply ends that reply; the chat goes on, with a new cache."""
    chat_tokenizer(shakespeare[:20_000]).save_pretrained(tmp_path)
    template = HuggingFaceChat(HuggingFaceTokenizer(str(tmp_path)))
    reply = template.tokenizer.encode("Café!", add_special_tokens=False)
    assert any("\ufffd" in template.decode(reply[:i]) for i in range(1, len(reply)))
    caches = []

    def stream(model, new_ids, cache, stop, args):
        caches.append(cache)
        yield from reply[:2]
        if len(caches) == 2:
            raise KeyboardInterrupt
        yield from [*reply[2:], stop]

    monkeypatch.setattr(chat, "stream", stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello.\nAgain.\nAnd again.\n"))
    model = types.SimpleNamespace(block_size=64, h=[])
    chat.chat(model, template, types.SimpleNamespace())
    printed = capsys.readouterr().out
    assert "> Hello.\nCafé!\n" in printed and "\ufffd" not in printed
    assert len(caches) == 3 and caches[2] is not caches[1]


def test_the_chat_leaves_with_status_0_after_a_ctrl_c_in_a_reply_or_at_its_prompt(
        trained, monkeypatch, capsys):
    """A Ctrl-C (a real SIGINT) stops the first reply; the chat goes on, and Ctrl-D then leaves
    with status 0, as does a Ctrl-C at the prompt."""
    folder, _ = trained

    def stream(model, new_ids, cache, stop, args):
        yield new_ids[0]
        os.kill(os.getpid(), signal.SIGINT)
        yield stop

    class CtrlCAtThePrompt(io.StringIO):
        def readline(self, *size):
            line = super().readline(*size)
            if not line:
                os.kill(os.getpid(), signal.SIGINT)
            return line

    monkeypatch.setattr(chat, "stream", stream)
    for stdin in (io.StringIO("Hello.\nAgain.\n"), CtrlCAtThePrompt("Hello.\n")):
        monkeypatch.setattr(sys, "stdin", stdin)
        run(lambda: chat.main(["--chat", "--out", str(folder)]))  # no SystemExit: status 0
        printed = capsys.readouterr()
        assert "Ctrl-C or Ctrl-D at the prompt, or /quit, leaves" in printed.out
        assert printed.out.count("> ") == 1 + stdin.getvalue().count("\n")
        assert printed.err == ""


def test_a_reply_ends_its_turn_only_at_its_end_token_with_no_other_turn_begun(template):
    text = template.tokenizer.encode("Nay.")
    user = template.ids["<|user|>"]
    assert chat.ended_its_turn([*text, template.end], template)
    assert not chat.ended_its_turn(text, template)
    # it wrote the user's next turn itself before it stopped: text that looks like one reply
    assert not chat.ended_its_turn([*text, user, *text, template.end], template)
    assert template.decode([*text, user, *text]) == "Nay.Nay."


def test_dropped_conversations_name_the_context_that_keeps_them_whole(template, capsys):
    whole = len(template.render(CONVERSATION)[0])
    short = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}]
    args = types.SimpleNamespace(block_size=12)
    chat.fine_tuning_data(args, template, [short, CONVERSATION], [short])
    out = capsys.readouterr().out
    assert "train: 2 conversations; in 12 tokens, 0 cut after a reply, 1 dropped" in out
    assert "val: 1 conversation; " in out
    assert f"  --block-size {whole - 1} would keep all of them whole" in out
    args.block_size = whole - 1
    _, cut, dropped = chat.fit(template, [CONVERSATION], args.block_size)
    assert (cut, dropped) == (0, 0)


def test_a_val_loss_that_rose_at_the_end_is_said():
    history = [{"step": step, "val": val} for step, val in ((0, 1.9), (20, 1.6), (40, 1.7))]
    assert chat.overfitting(history).startswith("the val loss rose after step 20 (1.6000 -> "
                                                "1.7000)")
    assert "--max-iters 20 stops earlier" in chat.overfitting(history)
    assert chat.overfitting(history[:2]) == ""
    # best before any step: no --max-iters 0 to give
    rose = chat.overfitting([{"step": 0, "val": 1.0}, {"step": 20, "val": 1.2}])
    assert "--max-iters" not in rose and "a smaller --lr" in rose


def test_without_init_from_stage_07s_default_run_is_made_first_and_fine_tuned(
        tmp_path, monkeypatch, capsys):
    """Where runs/07_modern is missing, the stage says so in a line and runs stage 07 with its
    defaults (here with a few steps more, to be quick), as a process of its own; then it
    fine-tunes what that run wrote. A stage 07 that stops early is named, with how to go on."""
    commands = []
    run = subprocess.run

    def quick_stage_07(command):
        commands.append(command)
        flags = [*quick_flags("07_modern"), "--block-size", "64"]
        return run([*command, *flags], stdout=subprocess.DEVNULL)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(chat.subprocess, "run", quick_stage_07)
    chat.main([*QUICK, *SMALL_BATCH])
    printed = capsys.readouterr().out
    assert printed.startswith("runs/07_modern holds no model yet: making it first with python "
                              "07_modern.py\n")
    assert commands == [[sys.executable, str(ROOT / "07_modern.py")]]
    assert "weights runs/07_modern" in printed and "step 6: train loss" in printed
    made = torch.load(tmp_path / "runs" / "07_modern" / "ckpt.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "runs" / "08_chat" / "ckpt.pt", weights_only=True)
    assert made["stage"] == "07_modern"
    assert checkpoint["config"]["vocab_size"] == made["config"]["vocab_size"] + 4
    # there now: not made again
    chat.main([*QUICK, *SMALL_BATCH, "--overwrite"])
    assert len(commands) == 1
    shutil.rmtree(tmp_path / "runs" / "07_modern")
    monkeypatch.setattr(chat.subprocess, "run", lambda command: types.SimpleNamespace(
        returncode=130))
    message = stage_error(capsys, chat.main, "--overwrite")
    assert ("python 07_modern.py stopped before it finished (status 130); finish it with python "
            "07_modern.py --resume" in message)


def test_fine_tuning_lowers_the_val_reply_loss_and_ends_with_a_demo(trained):
    _, printed = trained
    out = printed.split("fine-tuning on conversations")[1]
    losses = [float(line.split("val loss ")[1].split(",")[0])
              for line in out.splitlines() if "val loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "------------------------------ real reply" in out
    assert "of 3 replies ended the turn within --max-new-tokens 40: stopped at" in out


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def short_chats(path):
    """A JSONL file at path of 40 of Shakespeare's short exchanges: a line and its reply."""
    train, _ = chat.load_conversations()
    short = [c[:2] for c in train if len(c[0]["content"]) + len(c[1]["content"]) < 60][:40]
    return write_jsonl(path, [json.dumps({"messages": m}) for m in short])


def test_bad_conversations_are_refused_or_skipped_and_counted(capsys, tmp_path, base):
    good = json.dumps({"messages": CONVERSATION[1:3]})
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, '{"messages": [{"role": "user"}]}'])
    assert "bad.jsonl, line 2: message 1 has no text as its content" in stage_error(
        capsys, chat.main, "--data", bad, "--out", str(tmp_path / "run"))
    alone = json.dumps({"messages": CONVERSATION[1:2]})
    data = write_jsonl(tmp_path / "chats.jsonl", [good, alone, good])
    folder = tmp_path / "run"
    chat.main([*quick_flags("08_chat", folder, base), "--data", data])
    out = capsys.readouterr().out
    assert "1 of the conversations of" in out and "had no assistant turn: skipped" in out
    assert "train: 1 conversation; in 64 tokens, 0 cut" in out and "val: 1 conversation;" in out
    one = write_jsonl(tmp_path / "one.jsonl", [good, alone])
    assert "has one conversation to learn from" in stage_error(
        capsys, chat.main, "--data", one, "--out", str(tmp_path / "one"))
    message = stage_error(capsys, chat.main, *quick_flags("08_chat", tmp_path / "short", base),
                          "--data", data, "--block-size", "8")
    assert "no train conversation has a first reply that fits in --block-size 8" in message


# ---------------------------------------------------------------------- Hugging Face chat models

transformers = pytest.importorskip("transformers")

# ChatML, as SmolLM2 and Qwen write it, with the {% generation %} markers few templates have
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}"
          "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
          "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_tokenizer(text, template=CHATML):
    from test_modern import tokenizer_for_tests
    tokenizer = tokenizer_for_tests(text)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


def moved_copies(kind, root, text, names=("reference", "policy")):
    """A small random Llama (tied) or Qwen3 (QK-norm, untied) of transformers', saved with a
    ChatML tokenizer of text into a folder of root for each name, every weight moved a little
    before each save (norm gains away from 1): for DPO and GRPO, a reference and a policy apart
    from it. Returns the folders."""
    import transformers
    configs = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}
    torch.manual_seed(0)
    config = configs[kind](vocab_size=320, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=kind == "llama")
    model = transformers.AutoModelForCausalLM.from_config(config)
    tokenizer = chat_tokenizer(text)
    folders = []
    for name in names:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders.append(root / name)
    return folders


def test_the_reply_mask_of_a_stock_template_equals_its_generation_markers(shakespeare, tmp_path):
    marked = chat_tokenizer(shakespeare[:20_000])
    expected = marked.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
    # the same template without its markers, as stock templates are
    stock = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat_tokenizer(shakespeare[:20_000], stock).save_pretrained(tmp_path)
    template = HuggingFaceChat(HuggingFaceTokenizer(str(tmp_path)))
    assert template.end_text == "<|im_end|>"
    ids, learned = template.render(CONVERSATION)
    assert ids == expected["input_ids"]
    assert learned == [bool(m) for m in expected["assistant_masks"]] and any(learned)
    text = template.decode(learned_tokens(ids, learned))
    assert text == "Nay, answer me.Bernardo?"


def test_templates_whose_replies_cannot_be_found_are_refused(shakespeare, tmp_path):
    from test_modern import tokenizer_for_tests
    tokenizer_for_tests(shakespeare[:20_000]).save_pretrained(tmp_path / "none")
    with pytest.raises(UserError, match="has no chat template"):
        HuggingFaceChat(HuggingFaceTokenizer(str(tmp_path / "none")))
    # a template that writes a reply with no special token after it: nothing to stop at
    plain = CHATML.replace("'<|im_end|>'", "'.'").replace("<|im_end|>\\n", "\\n")
    chat_tokenizer(shakespeare[:20_000], plain).save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="not a special token that could end its turn"):
        HuggingFaceChat(HuggingFaceTokenizer(str(tmp_path / "plain")))
    # one that rewrites what it is given: its replies are not in its text
    upper = CHATML.replace("message['content']", "message['content'] | upper")
    chat_tokenizer(shakespeare[:20_000], upper).save_pretrained(tmp_path / "upper")
    with pytest.raises(UserError, match="changes the text of a message"):
        HuggingFaceChat(HuggingFaceTokenizer(str(tmp_path / "upper")))
    # one that rewrites only what the users say
    users = CHATML.replace("{{ message['content'] + '<|im_end|>\\n' }}",
                           "{{ message['content'] | upper + '<|im_end|>\\n' }}")
    assert users != CHATML
    chat_tokenizer(shakespeare[:20_000], users).save_pretrained(tmp_path / "users")
    template = HuggingFaceChat(HuggingFaceTokenizer(str(tmp_path / "users")))
    with pytest.raises(UserError, match="changes the text of a message"):
        template.render(CONVERSATION)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_fine_tune_a_hugging_face_model_on_jsonl_in_its_own_template(
        model_type, shakespeare, tmp_path, monkeypatch, capsys):
    configs = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}
    torch.manual_seed(0)
    config = configs[model_type](vocab_size=320, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    chat_tokenizer(shakespeare[:20_000]).save_pretrained(folder)
    data = short_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    chat.main(["--init-from", str(folder), "--data", data, "--block-size", "64",
               "--batch-size", "8", "--max-iters", "10", "--eval-interval", "10",
               "--eval-iters", "2", "--lr", "3e-3", "--max-new-tokens", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    losses = [float(line.split("val loss ")[1].split(",")[0])
              for line in printed.splitlines() if "val loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "pretraining" not in printed and "0 dropped" in printed
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["tokenizer"] == {"kind": "huggingface", "name": str(folder)}
    assert checkpoint["config"]["vocab_size"] == 320  # its own tokens: no rows added
    replies = chat_with(chat.main, out, ["Good morrow."], monkeypatch, capsys,
                        "--max-new-tokens", "3")
    assert replies.startswith("Talk to the model")
