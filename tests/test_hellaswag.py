"""HellaSwag's scoring against an independent computation with Hugging Face's GPT2LMHeadModel,
the flag in every stage from 06 on, and its refusals."""
import json

import pytest
import torch
from torch.nn import functional as F

from conftest import load_stage, quick_flags, stage_error
from shared import UserError, hellaswag
from shared.tokenizer import CharTokenizer, TiktokenTokenizer

pytest.importorskip("transformers")
gpt = load_stage("06_train_for_real")
# the stages that score it: the pretraining stages after 05
STAGES = ["06_train_for_real", "07_modern"]

# In HellaSwag's format (the real file has more keys, which are not read). The third context is
# longer than the tiny model's 32 tokens, so its rows are cropped on the left.
EXAMPLES = [
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.",
                                        "is ripping level tiles off.",
                                        "is holding a rubik's cube.",
                                        "starts pulling up roofing on a roof."], 3),
    ("A woman pours flour into a bowl. She", ["cracks two eggs over it and stirs.",
                                              "drives the bowl to the market.",
                                              "sings to the flour until it rises on its own.",
                                              "puts on her running shoes."], 0),
    ("The video begins with a long shot of a quiet lake at dawn, mist over the water, and a "
     "small wooden boat tied to a dock while birds call from the trees. A fisherman",
     ["walks down the dock and unties the boat.", "is flying.",
      "eats the lake.", "folds the dock into his pocket and whistles a tune he remembers."], 0),
    ("Two children kick a ball across a field. The ball", ["rolls into a goal.",
                                                          "melts.", "becomes a bird.",
                                                          "is sent by mail."], 0),
    ("A chef slices onions on a board. Then he", ["adds them to a hot pan.",
                                                  "plants the board in the garden.",
                                                  "paints the onions blue.",
                                                  "reads the onions a story."], 0),
    ("How to tie a tie. Put the tie around your neck.", ["Cross the wide end over the narrow.",
                                                         "Throw it out of the window.",
                                                         "Boil it for ten minutes.",
                                                         "Ask the tie to tie itself."], 0),
]


def write_examples(path, examples=EXAMPLES):
    path.write_text("".join(json.dumps({"ind": i, "ctx": context, "endings": endings,
                                        "label": label, "split": "val"}) + "\n"
                            for i, (context, endings, label) in enumerate(examples)))
    return path


def reference_losses(hf_model, examples, block_size):
    """Written out independently, one ending at a time through Hugging Face's model: the total
    and the mean loss of each ending's tokens after its context."""
    encoding = TiktokenTokenizer("gpt2")
    totals, means = [], []
    for context, endings, _ in examples:
        for ending in endings:
            context_ids, ending_ids = encoding.encode(context), encoding.encode(" " + ending)
            ids = (context_ids + ending_ids)[-block_size:]
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids])).logits[0]
            # position t predicts token t + 1: the ending's tokens are the last len(ending_ids)
            losses = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
            ending_losses = losses[-len(ending_ids):]
            totals.append(ending_losses.sum().item())
            means.append(ending_losses.mean().item())
    return torch.tensor(totals).view(-1, 4), torch.tensor(means).view(-1, 4)


def test_scores_are_hugging_faces_scores(hf_model_folder, tmp_path, capsys):
    folder, hf_model = hf_model_folder
    model = gpt.GPT.from_pretrained(folder)
    tokenized = hellaswag.load(write_examples(tmp_path / "val.jsonl"), TiktokenTokenizer("gpt2"),
                               model.block_size)
    assert "hellaswag: 6 examples" in capsys.readouterr().out
    assert max(len(row) for rows, _, _ in tokenized for row in rows) == 32  # cropped to fit
    # three examples a batch of 12 rows: the padding must change nothing
    totals, counts = hellaswag.ending_losses(model, tokenized, 12, "cpu")
    theirs_total, theirs_mean = reference_losses(hf_model, EXAMPLES, 32)
    torch.testing.assert_close(totals, theirs_total, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(totals / counts, theirs_mean, atol=1e-4, rtol=1e-5)
    # the picks, exactly: the endings' losses are further apart than any rounding
    for theirs in (theirs_total, theirs_mean):
        gaps = theirs.sort(1).values.diff(dim=1)[:, 0]
        assert gaps.min() > 1e-3
    assert torch.equal((totals / counts).argmin(1), theirs_mean.argmin(1))
    assert torch.equal(totals.argmin(1), theirs_total.argmin(1))
    labels = torch.tensor([label for _, _, label in EXAMPLES])
    expected = {"acc_norm": (theirs_mean.argmin(1) == labels).float().mean().item(),
                "acc": (theirs_total.argmin(1) == labels).float().mean().item()}
    scores = hellaswag.evaluate(model, tokenized, 8, "cpu")
    assert scores == pytest.approx(expected, abs=1e-12)
    # and from the command line, --init-from the folder
    gpt.main(["--init-from", str(folder), "--sample", "--hellaswag", str(tmp_path / "val.jsonl")])
    assert f"hellaswag acc_norm {expected['acc_norm']:.4f} (acc {expected['acc']:.4f})" in (
        capsys.readouterr().out)


@pytest.fixture(scope="module")
def shakespeare_examples(shakespeare):
    """Twenty examples in HellaSwag's format made of Tiny Shakespeare's lines, every character one
    that a model trained on it has: a line, then the next line and three from further on."""
    lines = [line for line in shakespeare.splitlines() if len(line) > 10]
    return [(lines[i], [lines[i + 1], lines[i + 40], lines[i + 80], lines[i + 120]], 0)
            for i in range(0, 400, 20)]


@pytest.mark.parametrize("name", STAGES)
def test_every_evaluation_scores_it_and_sample_scores_the_checkpoint(name, tmp_path, capsys,
                                                                     shakespeare_examples):
    """In training, a score at every evaluation, in the history too; --sample --hellaswag scores
    the checkpoint alone, to the numbers of the last evaluation (float32 in both); a bad file
    gets one sentence."""
    stage = load_stage(name)
    path = write_examples(tmp_path / "val.jsonl", shakespeare_examples)
    out = tmp_path / "run"
    stage.main([*quick_flags(name, out), "--dtype", "float32", "--hellaswag", str(path)])
    printed = capsys.readouterr().out
    assert "hellaswag: 20 examples" in printed
    scored = [line for line in printed.splitlines() if ", hellaswag acc_norm " in line]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(scored) == len(metrics["history"]) == 3
    last = metrics["history"][-1]["hellaswag"]
    assert set(last) == {"acc_norm", "acc"} and 0 <= last["acc_norm"] <= 1
    assert scored[-1].split(" | ")[0].endswith(hellaswag.summary(last))
    stage.main(["--sample", "--hellaswag", str(path), "--out", str(out)])
    assert capsys.readouterr().out.endswith(f"{out / 'ckpt.pt'}{hellaswag.summary(last)}\n")
    path.write_text(path.read_text() + "not json\n")
    err = stage_error(capsys, stage.main, "--sample", "--hellaswag", str(path), "--out", str(out))
    assert "line 21: not a HellaSwag example" in err


def test_a_character_tokenizer_leaves_out_what_it_cannot_encode(tmp_path, capsys):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .'")
    examples = [("a man", ["is here.", "is there.", "was.", "will be."], 0),
                ("A Man", ["is here.", "is there.", "was.", "will be."], 0)]
    tokenized = hellaswag.load(write_examples(tmp_path / "val.jsonl", examples), tokenizer, 16)
    assert len(tokenized) == 1
    assert "1 examples, 1 left out (characters the tokenizer lacks)" in capsys.readouterr().out
    with pytest.raises(UserError, match="can't encode any of the 1 HellaSwag examples"):
        hellaswag.load(write_examples(tmp_path / "val.jsonl", examples[1:]), tokenizer, 16)


@pytest.mark.parametrize("line, says", [
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "line 2: not a HellaSwag example"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "line 2: not a HellaSwag"),
    ('{"ctx": "a", "endings": ["b", "", "d", "e"], "label": 1}', "line 2: not a HellaSwag"),
    ("not json", "line 2: not a HellaSwag example"),
    ("", "holds no examples"),
])
def test_a_file_not_in_its_format_gets_one_sentence(tmp_path, line, says):
    path = tmp_path / "val.jsonl"
    path.write_text(("" if says == "holds no examples" else json.dumps(
        {"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1})) + "\n" + line + "\n")
    with pytest.raises(UserError, match=says):
        hellaswag.read_examples(path)


def test_no_file_and_no_network_gets_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "DEFAULT_PATH", tmp_path / "hellaswag_val.jsonl")
    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_val.jsonl")
    with pytest.raises(UserError, match="could not download HellaSwag's validation set") as err:
        hellaswag.read_examples()
    assert "--hellaswag FILE" in str(err.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="no such file|cannot read"):
        hellaswag.read_examples(tmp_path / "missing.jsonl")
