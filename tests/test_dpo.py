"""Stage 10: DPO's loss and statistics against trl's, its reference, and bad preference files."""
import json
import math
import shutil
import subprocess
import types

import pytest
import torch

from conftest import PAIRS, QUICK, SMALL_BATCH, load_stage, quick_flags, stage_error
from shared.conversations import load_conversations, parse_preference
from test_chat import moved_copies, write_jsonl

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
# slow to import the first time: once, for every test here
trl = pytest.importorskip("trl")

dpo = load_stage("10_dpo")
# what it builds on: the model, LoRA and the chat template are stage 09's
trunk = load_stage("09_lora")
BETA = 0.1


@pytest.fixture(scope="module")
def pairs():
    """Four of Shakespeare's short exchanges in trl's conversational format: the line said, its
    real reply chosen, the next exchange's reply rejected (replies of different lengths, so that
    rows are padded)."""
    train, _ = load_conversations()
    short = [c[:2] for c in train if len(c[0]["content"]) + len(c[1]["content"]) < 60][:4]
    return [{"prompt": [prompt], "chosen": [reply], "rejected": [short[(i + 1) % 4][1]]}
            for i, (prompt, reply) in enumerate(short)]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def folders(request, tmp_path_factory, shakespeare):
    """A small random Llama (tied) or Qwen3 (QK-norm, untied), saved with a ChatML tokenizer: the
    reference; and a copy of it, every weight moved a little, the policy of full fine-tuning."""
    return moved_copies(request.param, tmp_path_factory.mktemp("hf"), shakespeare[:20_000])


def lora_flags(rank, folder=None):
    """The flags of LoRA of rank (alpha 2 rank) on every projection of the model --init-from
    folder."""
    return types.SimpleNamespace(lora_rank=rank, lora_alpha=2.0 * rank, lora_dropout=0.0,
                                 lora_targets=trunk.TARGETS, init_from=folder)


def as_read(pairs):
    """The pairs as the stage reads them from a file: a prompt, and the texts of two replies."""
    return [parse_preference(json.dumps(pair)) for pair in pairs]


def trl_step(folder, pairs, out, ref_model=None, peft_config=None, **config):
    """trl's DPOTrainer on the model in folder, in float32 on the CPU: one batch of every pair from
    its data loader, its loss on that batch (the gradient of what trains worked out) and what it
    logged of it."""
    args = trl.DPOConfig(output_dir=str(out), beta=BETA, per_device_train_batch_size=len(pairs),
                         report_to="none", use_cpu=True, bf16=False,
                         activation_checkpointing=False, precompute_ref_log_probs=False,
                         disable_dropout=True, **config)
    trainer = trl.DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder),
                             ref_model=ref_model, args=args,
                             train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                             peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    # in training mode, as its training step puts it: what it logs is the train metrics
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return trainer, batch, loss.item(), logged


def ours_from(batch):
    """Our inputs and targets of trl's batch (its chosen rows, then its rejected ones, padded on
    the right): the targets are the next tokens where trl's completion mask learns them, else
    -1."""
    ids = batch["input_ids"]
    learned = batch["completion_mask"][:, 1:].bool()
    return ids[:, :-1], ids[:, 1:].masked_fill(~learned, -1)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
@pytest.mark.parametrize("reference", ["adapters off", "frozen copy"])
def test_the_loss_and_statistics_equal_trls(folders, pairs, tmp_path, reference, sft_weight):
    reference_folder, policy_folder = folders
    # trl's "sft" loss type is the chosen replies' mean loss per token, weighted
    config = {}
    if sft_weight:
        config = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_weight])
    if reference == "adapters off":
        # A and B both random, so that the policy is not its reference
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=trunk.TARGETS, lora_dropout=0.0,
                               init_lora_weights=False)
        trainer, batch, loss, logged = trl_step(reference_folder, pairs, tmp_path,
                                                peft_config=lora, **config)
        model, _ = dpo.load_model(str(reference_folder))
        trunk.add_lora(model, trunk.lora_settings(lora_flags(4, str(reference_folder)), model))
        state = trainer.model.state_dict()
        copied = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    module, matrix = name.rsplit(".", 1)
                    their_name = trunk.hugging_face_name(module)
                    p.copy_(state[f"base_model.model.{their_name}.{matrix}.default.weight"])
                    copied += 1
        assert copied == 2 * 2 * len(trunk.TARGETS)
        ours = dpo.DPO(model, None, BETA, sft_weight)

        def their_name(name):
            module, matrix = name.rsplit(".", 1)
            return f"base_model.model.{trunk.hugging_face_name(module)}.{matrix}.default.weight"
    else:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(reference_folder)
        trainer, batch, loss, logged = trl_step(policy_folder, pairs, tmp_path, ref_model=theirs,
                                                **config)
        policy, _ = dpo.load_model(str(policy_folder))
        frozen, _ = dpo.load_model(str(reference_folder))
        ours = dpo.DPO(policy, frozen.requires_grad_(False).eval(), BETA, sft_weight)
        their_name = trunk.hugging_face_name
    x, y = ours_from(batch)
    statistics, our_loss = ours(x, y)
    our_loss.backward()
    # the policy is not its reference: the rewards are not all 0
    assert abs(logged["rewards/chosen"]) > 1e-3 and abs(logged["rewards/rejected"]) > 1e-3
    assert abs(our_loss.item() - loss) <= 1e-5
    for key, name in (("chosen", "rewards/chosen"), ("rejected", "rewards/rejected"),
                      ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies")):
        assert abs(statistics[key].item() - logged[name]) <= 1e-5, key
    # the same gradient of every weight that trains (the adapters, or every weight)
    theirs = dict(trainer.model.named_parameters())
    trained = [(name, p) for name, p in ours.policy.named_parameters() if p.requires_grad]
    assert len(trained) == (4 * len(trunk.TARGETS) if reference == "adapters off" else
                            len(list(ours.policy.parameters())))
    for name, p in trained:
        assert (p.grad - theirs[their_name(name)].grad).abs().max() <= 1e-5, name
    assert max(p.grad.abs().max() for _, p in trained) > 1e-3


def test_the_pairs_are_rendered_as_trl_renders_them(folders, pairs, tmp_path):
    """The same tokens in a row; the same learned but for the newline that ChatML writes after
    <|im_end|>, which trl counts as part of the reply and the stage does not."""
    trainer, *_ = trl_step(folders[0], pairs, tmp_path)
    _, template = dpo.load_model(str(folders[0]))
    (_, targets), cut, dropped = dpo.fit_pairs(template, as_read(pairs), 96)
    assert (cut, dropped) == (0, 0)
    newline = template.tokenizer.encode("\n", add_special_tokens=False)
    for i, (pair, theirs) in enumerate(zip(pairs, trainer.train_dataset, strict=True)):
        for side, key in enumerate(("chosen", "rejected")):
            reply = {"role": "assistant", "content": pair[key][0]["content"]}
            ids, _ = template.render([*pair["prompt"], reply])
            assert ids == theirs["prompt_ids"] + theirs[f"{key}_ids"]
            learned = targets[i, side][targets[i, side] != -1].tolist()
            assert learned + newline == theirs[f"{key}_ids"]


@pytest.fixture
def small(tokenizer, pairs):
    """A small model of ours with stage 08's template, every weight random, and a batch of the
    pairs (chosen rows, then rejected) as fit_pairs and get_batch make it."""
    template = trunk.ChatTemplate(tokenizer)
    torch.manual_seed(0)
    config = trunk.GPTConfig(block_size=96, vocab_size=template.vocab_size, n_layer=2, n_head=2,
                             n_embd=32)
    model = trunk.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the zero-initialized projections too
    data, cut, _ = dpo.fit_pairs(template, as_read(pairs), 96)
    assert cut == 0
    x, y = dpo.get_batch(data, len(pairs), 96, torch.device("cpu"))
    return model, x, y


def test_dpo_trains_towards_the_chosen_replies_through_the_stages_loop(tokenizer):
    """get_batch and train() as the stage runs them: a batch is the chosen rows, then the rejected
    ones, so that training raises the chosen replies against the rejected on the pairs it learns
    (DPO's loss alone could not tell the two ways round apart: ln 2 at the start, falling
    after). Four exchanges' real replies chosen, four others' rejected: no reply is on both
    sides."""
    cpu = torch.device("cpu")
    train, _ = load_conversations()
    short = [c[:2] for c in train if len(c[0]["content"]) + len(c[1]["content"]) < 60][:8]
    pairs = [{"prompt": [prompt], "chosen": [reply], "rejected": [short[i + 4][1]]}
             for i, (prompt, reply) in enumerate(short[:4])]
    template = trunk.ChatTemplate(tokenizer)
    torch.manual_seed(0)
    config = trunk.GPTConfig(block_size=96, vocab_size=template.vocab_size, n_layer=2, n_head=2,
                             n_embd=32)
    model = trunk.GPT(config)
    data, _, _ = dpo.fit_pairs(template, as_read(pairs), 96)
    x, _ = dpo.get_batch(data, 8, 96, cpu)
    chosen = {tuple(row) for row in data[0][:, 0].tolist()}
    assert all(tuple(row) in chosen for row in x[:8].tolist())
    args = types.SimpleNamespace(lr=1e-2, weight_decay=0.0, warmup_iters=1, max_iters=20,
                                 grad_clip=1.0, dtype="float32", eval_interval=20, eval_iters=2,
                                 batch_size=4, block_size=96, seed=0, world_size=1,
                                 grad_accum_steps=1)
    ours = dpo.DPO(model, dpo.make_reference(lora_flags(0), model, None, cpu), BETA, 0.0)
    optimizer = dpo.configure_optimizer(model, args)
    history, _, _ = dpo.train(ours, optimizer, data, data, args, cpu, 0, [],
                              lambda step, history: None)
    assert history[0]["val_margin"] == 0 and history[-1]["val_margin"] > 1
    assert history[-1]["val_accuracy"] == 1


@pytest.mark.parametrize("rank", [4, 0])
def test_a_policy_equal_to_its_reference_has_loss_ln_2_and_no_reward(small, rank):
    model, x, y = small
    if rank:
        trunk.add_lora(model, trunk.lora_settings(lora_flags(rank), model))  # B at zero
    reference = dpo.make_reference(lora_flags(rank), model, None, torch.device("cpu"))
    # under LoRA the reference is the model itself, its adapters off
    assert (reference is None) == bool(rank)
    with torch.no_grad():
        statistics, loss = dpo.DPO(model, reference, BETA, 0.0)(x, y)
    assert abs(loss - torch.log(torch.tensor(2.0))) <= 1e-6
    assert statistics["chosen"] == 0 and statistics["rejected"] == 0
    assert statistics["margin"] == 0 and statistics["accuracy"] == 0


def reference_logps(ours, x, y):
    with torch.no_grad():
        if ours.reference is not None:
            return dpo.sequence_logps(ours.reference, x, y)
        with dpo.adapters_off(ours.policy):
            return dpo.sequence_logps(ours.policy, x, y)


@pytest.mark.parametrize("rank", [4, 0])
def test_only_the_policy_trains_and_the_reference_stays_as_it_was(small, rank):
    model, x, y = small
    if rank:
        trunk.add_lora(model, trunk.lora_settings(lora_flags(rank), model))
    reference = dpo.make_reference(lora_flags(rank), model, None, torch.device("cpu"))
    ours = dpo.DPO(model, reference, BETA, 0.0)
    ours(x, y)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name or not rank), name
    if not rank:
        assert all(p.grad is None for p in ours.reference.parameters())
    model.zero_grad(set_to_none=True)
    before = reference_logps(ours, x, y)
    with torch.no_grad():
        policy_before = dpo.sequence_logps(model, x, y)
    args = types.SimpleNamespace(lr=1e-2, weight_decay=0.1, warmup_iters=1, max_iters=10,
                                 grad_clip=1.0, dtype="float32")
    optimizer = dpo.configure_optimizer(model, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [dpo.train_step(ours, optimizer, [(x, y)], args, step, scaler) for step in range(3)]
    assert torch.equal(reference_logps(ours, x, y), before)
    with torch.no_grad():
        assert (dpo.sequence_logps(model, x, y) - policy_before).abs().max() > 1e-3
    # DPO's loss starts at ln 2 and falls as the policy learns the pairs
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]


GOOD = {"prompt": [{"role": "user", "content": "Who's there?"}],
        "chosen": [{"role": "assistant", "content": "Nay, answer me."}],
        "rejected": [{"role": "assistant", "content": "Long live the king!"}]}


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    (json.dumps({"chosen": GOOD["chosen"], "rejected": GOOD["rejected"]}),
     'line 2: not an object with "prompt", "chosen" and "rejected" lists'),
    (json.dumps({**GOOD, "chosen": GOOD["prompt"]}),
     """line 2: "chosen" is not one message of the assistant's"""),
    (json.dumps({**GOOD, "chosen": GOOD["chosen"] * 2}),
     """line 2: "chosen" is not one message of the assistant's"""),
    (json.dumps({**GOOD, "rejected": GOOD["chosen"]}),
     "line 2: the chosen and the rejected reply are the same: nothing to prefer"),
])
def test_bad_preference_lines_get_one_sentence_naming_the_line(tmp_path, capsys, line, message):
    data = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps(GOOD), line, json.dumps(GOOD)])
    assert message in stage_error(capsys, dpo.main, "--data", data, "--out",
                                  str(tmp_path / "run"))


def test_fewer_than_two_pairs_are_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps(GOOD), ""])
    assert "holds fewer than two preference pairs" in stage_error(
        capsys, dpo.main, "--data", data, "--out", str(tmp_path / "run"))


def test_dpo_of_a_hugging_face_model_with_adapters_then_merged_and_exported(folders, pairs,
                                                                            tmp_path, capsys):
    """The whole stage on a Hugging Face model, as its command line runs it: DPO with adapters on
    pairs in trl's format, the val loss below ln 2 after a few steps; then the adapters merged
    into a save_pretrained folder that transformers loads with our logits."""
    reference, _ = folders
    data = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps(pair) for pair in pairs * 3])
    out = tmp_path / "run"
    # DPO's loss alone (--sft-weight 0), which falls below ln 2 as the pairs are learned
    dpo.main(["--init-from", str(reference), "--data", data, "--lora-rank", "4", "--lr", "1e-2",
              "--sft-weight", "0",
              "--batch-size", "4", "--max-iters", "8", "--eval-interval", "8", "--eval-iters",
              "2", "--max-new-tokens", "2", "--out", str(out)])
    losses = [float(line.split("val loss ")[1].split(",")[0])
              for line in capsys.readouterr().out.splitlines() if line.startswith("step 8:")]
    assert losses and losses[0] < math.log(2)
    dpo.main(["--merge", "--out", str(out)])
    model, _ = dpo.load_model(out)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    x = torch.randint(320, (2, 24))
    with torch.no_grad():
        assert (model.eval()(x)[0] - exported(x).logits).abs().max() <= 1e-5


# ---------------------------------------------------------------- on its command line, as a user

def quick(base, out, *flags):
    """Flags of a quick run of the stage on the chat model of the base fixture and its pairs."""
    return [*quick_flags("10_dpo", out, base / "chat"), *flags]


def test_a_resumed_run_keeps_the_rank_it_trained_with(base, tmp_path, capsys):
    dpo.main(quick(base, tmp_path, "--max-iters", "2"))
    message = stage_error(capsys, dpo.main, *quick(base, tmp_path, "--max-iters", "4", "--resume",
                                                   "--lora-rank", "4"))
    assert "was trained with --lora-rank 0, not 4; resume with the flags it was trained" in message


@pytest.mark.parametrize("flag", [["--lora-alpha", "32"], ["--lora-dropout", "0.1"],
                                  ["--lora-targets", "q_proj"]])
def test_adapter_flags_without_adapters_are_refused(base, tmp_path, capsys, flag):
    message = stage_error(capsys, dpo.main, *quick(base, tmp_path, *flag))
    assert f"{flag[0]} shapes adapters, and --lora-rank 0 trains without them" in message
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_model_that_is_no_chat_model_yet_is_refused_naming_its_stage(base, tmp_path, capsys):
    # the quick run of stage 07, which has no rows for the template's tokens yet
    flags = [*quick(base, tmp_path), "--init-from", str(base)]
    message = stage_error(capsys, dpo.main, *flags)
    assert f"{base} holds a model with no chat template yet (07_modern.py, step 6)" in message
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_run_of_stage_06_is_refused_with_what_to_give(tmp_path, capsys):
    gpt2 = tmp_path / "06"
    load_stage("06_train_for_real").main([*quick_flags("06_train_for_real", gpt2)])
    message = stage_error(capsys, dpo.main, "--init-from", str(gpt2), "--out",
                          str(tmp_path / "run"))
    assert "is a checkpoint of 06_train_for_real.py, whose GPT-2 model this stage" in message
    assert "give --init-from a run of stage 07 or later" in message


def test_a_character_the_model_has_no_token_for_names_its_line(base, tmp_path, capsys):
    odd = {**GOOD, "chosen": [{"role": "assistant", "content": "Nay, ½ of it."}]}
    data = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps(GOOD)] * 3 + [json.dumps(odd)])
    message = stage_error(capsys, dpo.main, *quick(base, tmp_path / "run"), "--data", data)
    assert "the preference pair of line 4: the character '½' never occurs" in message


def test_a_few_pairs_of_ones_own_are_said_to_measure_little(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", [json.dumps(GOOD)] * 12)
    dpo.main([*quick(base, tmp_path / "run"), "--data", data, "--max-new-tokens", "2"])
    printed = capsys.readouterr().out
    assert "  2 val pairs alone: the val loss, margin and accuracy say little" in printed
    # a step trains on both sequences of each of its 4 pairs
    assert "8 x 64 tokens x 1 accumulation x 1 process(es) = 512 tokens per step" in printed
    # the closing figures are of the pairs made from Tiny Shakespeare, not of one's own
    assert "ended their turn" not in printed and "the real replies" not in printed


def test_without_init_from_stage_08s_default_run_is_made_first_and_said_in_two_lines(
        base, tmp_path, monkeypatch, capsys):
    """Where runs/08_chat is missing, the stage makes it (here a quick run, on a quick run of 07
    already in runs/07_modern) as a process of its own, whose output goes to its made.log: the
    line that it is being made, and the line of its last evaluation."""
    shutil.copytree(base, tmp_path / "runs" / "07_modern")
    popen = subprocess.Popen

    def quick_stage_08(command, **options):
        return popen([*command, *QUICK, *SMALL_BATCH], **options)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trunk.subprocess, "Popen", quick_stage_08)
    dpo.main([*QUICK, *SMALL_BATCH, "--data", str(base / "chat" / PAIRS)])
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == ("runs/08_chat holds no model yet: making it first with python 08_chat.py "
                        "(what it prints: runs/08_chat/made.log)")
    assert lines[1].startswith("  made runs/08_chat: step 6: train loss ")
    assert "weights runs/08_chat" in printed
    # the run that made it, its demo included, in its log alone
    made = (tmp_path / "runs" / "08_chat" / "made.log").read_text()
    assert "talk to it with python 08_chat.py --chat" in made
    assert "python 08_chat.py --chat" not in printed
