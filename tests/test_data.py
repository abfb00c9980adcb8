import hashlib
import shutil
import subprocess

import pytest
import torch

from shared import UserError, data
from shared.conversations import dialogue, read_conversations, shakespeare_conversations
from shared.data import get_batch, load_dataset, read_text
from shared.tokenizer import CharTokenizer, make_tokenizer


def test_tiny_shakespeare_is_verified(shakespeare):
    assert len(shakespeare) == 1_115_394
    assert hashlib.sha256(shakespeare.encode("utf-8")).hexdigest() == data.SHA256
    assert len(set(shakespeare)) == 65


@pytest.fixture
def local_copy(tmp_path, monkeypatch):
    """Point the loader at a copy of Tiny Shakespeare in a temporary folder."""
    path = tmp_path / "data" / "tinyshakespeare.txt"
    path.parent.mkdir()
    shutil.copy(data.DEFAULT_PATH, path)
    monkeypatch.setattr(data, "DEFAULT_PATH", path)
    return path


def test_corrupted_file_is_refused(local_copy):
    raw = bytearray(local_copy.read_bytes())
    raw[1000] ^= 1
    local_copy.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="SHA-256"):
        read_text()


def test_download_verifies_and_renames_into_place(local_copy, tmp_path, monkeypatch):
    source = tmp_path / "served.txt"
    shutil.move(local_copy, source)
    monkeypatch.setattr(data, "URL", source.as_uri())
    assert len(read_text()) == 1_115_394  # fetched on first use, from the (local) URL
    assert local_copy.exists()
    assert list(local_copy.parent.iterdir()) == [local_copy]  # no temporary file left behind


def test_bad_download_leaves_no_file(local_copy, tmp_path, monkeypatch):
    source = tmp_path / "served.txt"
    source.write_text("not Shakespeare at all\n" * 100)
    local_copy.unlink()
    monkeypatch.setattr(data, "URL", source.as_uri())
    with pytest.raises(UserError, match="wrong checksum"):
        read_text()
    assert list(local_copy.parent.iterdir()) == []


def test_offline_download_says_what_to_do(local_copy, monkeypatch):
    local_copy.unlink()
    monkeypatch.setattr(data, "URL", "http://127.0.0.1:9/input.txt")  # nothing listens there
    with pytest.raises(UserError, match="could not download.*--data") as err:
        read_text()
    assert str(local_copy) in str(err.value)
    assert list(local_copy.parent.iterdir()) == []


def test_user_text_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo wörld, " * 100, encoding="utf-8")
    assert read_text(good).startswith("héllo")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UserError, match="at least"):
        read_text(short)
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(UserError, match="not UTF-8"):
        read_text(binary)
    with pytest.raises(UserError, match="no such file"):
        read_text(tmp_path / "missing.txt")


def test_tokenizer_round_trip(shakespeare, tokenizer):
    assert tokenizer.vocab_size == 65
    ids = tokenizer.encode(shakespeare[:5000])
    assert all(0 <= i < 65 for i in ids)
    assert tokenizer.decode(ids) == shakespeare[:5000]
    assert tokenizer.decode(tokenizer.encode(shakespeare)) == shakespeare


def test_unknown_character_is_named():
    tokenizer = CharTokenizer("abc")
    with pytest.raises(UserError, match="'é'"):
        tokenizer.encode("abé")


def test_split_is_90_10(shakespeare):
    tokenizer, train_data, val_data = load_dataset(block_size=8)
    assert (len(train_data), len(val_data)) == (1_003_854, 111_540)
    assert tokenizer.decode(val_data[:20].tolist()) == shakespeare[1_003_854:1_003_874]


def test_get_batch_targets_are_inputs_shifted_by_one():
    data_ = torch.arange(1000)
    x, y = get_batch(data_, batch_size=16, block_size=12, device="cpu")
    assert x.shape == y.shape == (16, 12)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)


def test_validation_split_must_fit_the_block(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("abcdefghij" * 100)  # 1000 characters, 100 for validation
    load_dataset(path, block_size=99)
    with pytest.raises(UserError, match="block size"):
        load_dataset(path, block_size=100)


def test_a_killed_downloads_leftover_is_removed_by_the_next_one(local_copy, tmp_path, monkeypatch):
    source = tmp_path / "served.txt"
    shutil.move(local_copy, source)
    monkeypatch.setattr(data, "URL", source.as_uri())
    gone = subprocess.Popen(["true"])
    gone.wait()  # its process id now belongs to no one
    leftover = local_copy.parent / f"{local_copy.name}.{gone.pid}.x1y2.tmp"
    leftover.write_text("the first half of a download")
    assert len(read_text()) == 1_115_394
    assert list(local_copy.parent.iterdir()) == [local_copy]


@pytest.mark.parametrize("typo,meant", [("GPT2", "gpt2"), ("gtp2", "gpt2"), ("Char", "char")])
def test_a_typo_of_a_tokenizer_name_is_answered_at_once(typo, meant):
    """Not taken for a Hugging Face hub name, whose look-up waits on the network."""
    with pytest.raises(UserError, match=f"--tokenizer {typo}: .* did you mean {meant}\\?"):
        make_tokenizer(typo, "some text")


def jsonl(tmp_path, *lines):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


REPLY = ('{"messages": [{"role": "system", "content": "Be brief."}, '
         '{"role": "user", "content": "Who art thou?"}, '
         '{"role": "assistant", "content": "A friend.", "weight": 1}]}')


def test_conversations_are_read_and_those_without_a_reply_are_counted(tmp_path):
    no_reply = '{"messages": [{"role": "user", "content": "Anyone there?"}]}'
    conversations, skipped = read_conversations(jsonl(tmp_path, REPLY, "", no_reply, REPLY))
    assert skipped == 1
    assert conversations == [[{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Who art thou?"},
                              {"role": "assistant", "content": "A friend."}]] * 2


@pytest.mark.parametrize("line,problem", [
    ('{"messages": [', "line 2: not JSON (Expecting value at column 15)"),
    ('[{"role": "user", "content": "hi"}]', 'line 2: not an object with a "messages" list'),
    ('{"messages": []}', "line 2: no messages"),
    ('{"messages": ["hi"]}', "line 2: message 1 is not an object with a role and a content"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}',
     "line 2: message 2 has the role 'bot', not one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}',
     "line 2: message 1 has no text as its content"),
])
def test_a_line_that_is_not_a_conversation_gets_one_sentence_with_its_number(tmp_path, line,
                                                                              problem):
    path = jsonl(tmp_path, REPLY, line)
    with pytest.raises(UserError) as error:
        read_conversations(path)
    assert str(error.value) == f"--data {path}, {problem}"


def test_a_file_with_nothing_to_learn_from_is_refused(tmp_path):
    path = jsonl(tmp_path, '{"messages": [{"role": "user", "content": "Anyone there?"}]}')
    with pytest.raises(UserError, match="no conversation with an assistant turn"):
        read_conversations(path)


def test_the_plays_dialogue_becomes_conversations_between_two_speakers():
    play = ("ANNE:\nHello.\n\nBEN:\nHi.\n\nANNE:\nHow now?\nWhat news?\n\nBEN:\nWell.\n\n"
            "CLEO:\nWho comes?\n\nANNE:\nA friend.\n\nDION:\nStay.\n\n")
    assert dialogue(play) == [
        [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
         {"role": "user", "content": "How now?\nWhat news?"},
         {"role": "assistant", "content": "Well."}],
        [{"role": "user", "content": "Who comes?"}, {"role": "assistant", "content": "A friend."}]]


def test_shakespeares_train_and_val_conversations_come_from_their_own_side_of_the_split(
        shakespeare):
    train, val = shakespeare_conversations(shakespeare)
    assert (len(train), len(val)) == (1562, 241)
    split = int(0.9 * len(shakespeare))
    for conversations, text in [(train, shakespeare[:split]), (val, shakespeare[split:])]:
        assert all(message["content"] in text for c in conversations for message in c)
        assert all(c[-1]["role"] == "assistant" and len(c) % 2 == 0 for c in conversations)
