"""Stage 11: GRPO's advantages and loss against trl's GRPOTrainer, the tasks' checkers, and RL
raising a made-up task's reward."""
import io
import itertools
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import ROOT, load_stage, quick_flags, stage_error
from shared import UserError
from shared.tokenizer import CharTokenizer
from test_chat import moved_copies, write_jsonl

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
# slow to import the first time: once, for every test here
trl = pytest.importorskip("trl")

grpo = load_stage("11_grpo")
# what it builds on: the model, LoRA and the chat template are stage 09's
trunk = load_stage("09_lora")
CPU = torch.device("cpu")
# replies to each problem (G), the clip's epsilon and the KL penalty's beta, where on
G = 4
EPSILON = 0.2
BETA = 0.04


@pytest.fixture(scope="module")
def backwards():
    return grpo.Backwards(types.SimpleNamespace(data=None))


@pytest.fixture(scope="module")
def models(tmp_path_factory, shakespeare):
    """By architecture, a small random Qwen3 (QK-norm, untied head) or Llama (tied), saved with a
    ChatML tokenizer: the reference; and a copy of it, every weight moved a little, the policy
    that RL has moved away from it. Each made when first asked for."""
    made = {}

    def folders(architecture):
        if architecture not in made:
            made[architecture] = moved_copies(architecture, tmp_path_factory.mktemp("hf"),
                                              shakespeare[:20_000])
        return made[architecture]

    return folders


@pytest.fixture(scope="module")
def folders(models):
    return models("qwen3")


# the texts of the G replies to the first problem of a batch and to the second ({right}: its
# right answer): rewards 1 0 1 0 and 0 1 0 0, so that the groups' means and stds differ; the
# last reply of the first is cut at reply_tokens, and replies are of different lengths
REPLIES = [["{right}", "nay", "{right}", "my good lord, " * 4],
           ["what, ho!", "{right}", "nay", "no"]]


def sampled(template, batch, reply_tokens):
    """The token ids of REPLIES to the batch (G rows a problem) as sample_replies returns them:
    to the end token, or cut at reply_tokens."""
    replies = []
    for group, word in enumerate(batch[::G]):
        for text in REPLIES[group]:
            ids = template.tokenizer.encode(text.format(right=word[::-1]),
                                            add_special_tokens=False)
            replies.append((ids + [template.end])[:reply_tokens])
    return replies


def trl_trainer(folder, task, out, **config):
    """trl's GRPOTrainer on the model in folder, in float32 on the CPU, one generation batch of
    two of the task's val problems, G replies each; rewarded by the task's checker where a reply
    ended its turn, 0 where it did not (as rollout rewards them)."""

    def reward(completions, completion_ids, word, **kwargs):
        return [task.reward(w, c[0]["content"]) if ids[-1] == end else 0.0
                for w, c, ids in zip(word, completions, completion_ids, strict=True)]

    args = trl.GRPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False,
                          activation_checkpointing=False, num_generations=G,
                          per_device_train_batch_size=2 * G, epsilon=EPSILON,
                          max_completion_length=task.reply_tokens, **config)
    problems = [{"prompt": task.messages(word), "word": word} for word in task.val[:2]]
    processing_class = transformers.AutoTokenizer.from_pretrained(folder)
    end = processing_class.convert_tokens_to_ids("<|im_end|>")
    return trl.GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder),
                           reward_funcs=reward, args=args,
                           train_dataset=datasets.Dataset.from_list(problems),
                           processing_class=processing_class)


# every switch on Qwen3; on Llama (a tied head), the two ends
CASES = [("qwen3", loss_type, scale_rewards, beta) for loss_type in ("grpo", "dr_grpo", "dapo")
         for scale_rewards in ("group", "none") for beta in (0.0, BETA)]
CASES += [("llama", "grpo", "group", BETA), ("llama", "dapo", "none", 0.0)]


@pytest.mark.parametrize("architecture, loss_type, scale_rewards, beta", CASES)
def test_the_advantages_loss_and_gradients_equal_trls(models, backwards, tmp_path, monkeypatch,
                                                      architecture, loss_type, scale_rewards,
                                                      beta):
    """The same replies to the same prompts, laid out by rollout for us and by trl's
    _generate_and_score_completions for it (only its sampling replaced), with the same rewards:
    the same advantages, KL, loss and gradients, on-policy and with old log-probabilities far
    enough from the current ones for the clip to act."""
    reference_folder, policy_folder = models(architecture)
    # trl's defaults otherwise, its KL multiplied by the ratio included
    trainer = trl_trainer(policy_folder, backwards, tmp_path, loss_type=loss_type,
                          scale_rewards=scale_rewards, beta=beta)
    if beta:
        # trl loads its reference as the policy it is given: make it the one RL started from
        reference = transformers.AutoModelForCausalLM.from_pretrained(reference_folder)
        trainer.ref_model.load_state_dict(reference.state_dict())
    batch = next(iter(trainer.get_train_dataloader()))
    words = [row["word"] for row in batch]
    assert words == [word for word in words[::G] for _ in range(G)]
    policy, template = grpo.load_model(str(policy_folder))
    replies = sampled(template, words, backwards.reply_tokens)
    assert template.end not in replies[3]  # cut at reply_tokens
    prompts = {}

    def trl_sampling(prompt_ids, images, multimodal_fields, num_generations):
        prompts["trl"] = prompt_ids
        return replies, None

    def our_sampling(model, template, starts, max_new_tokens, device):
        prompts["ours"] = starts
        return replies

    monkeypatch.setattr(trainer, "_generate_single_turn", trl_sampling)
    monkeypatch.setattr(grpo, "sample_replies", our_sampling)
    # as its training loop runs a step of one batch
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(batch)
    flags = types.SimpleNamespace(group_size=G, kl_beta=beta, clip_epsilon=EPSILON,
                                  loss_norm=loss_type)
    x, y, rewards = grpo.rollout(policy, backwards, template, words[::G], flags, CPU)
    assert prompts["ours"] == prompts["trl"]
    # trl pads the shorter prompt on the left, rollout every row on the right
    assert not inputs["prompt_mask"].all()
    assert rewards.tolist() == [1, 0, 1, 0, 0, 1, 0, 0]
    advantages = grpo.group_advantages(rewards, G, scale_rewards == "group")
    assert (advantages - inputs["advantages"]).abs().max() <= 1e-5
    reference = None
    if beta:
        reference = grpo.load_model(str(reference_folder))[0].requires_grad_(False).eval()
    ours = grpo.GRPO(policy, reference, flags, backwards.reply_tokens)
    learned = y != -1
    completion = inputs["completion_mask"].bool()
    assert learned.sum() == completion.sum()
    with torch.no_grad():
        logps = grpo.token_logps(policy, x, y)
    # each token's old log-probability up to 0.6 away from its current one
    shift = torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.6
    old_logps = (logps + shift) * learned
    for old in (None, old_logps):
        if old is not None:
            # trl's layout: each reply's tokens from the first column on
            inputs["old_per_token_logps"] = torch.zeros(completion.shape)
            inputs["old_per_token_logps"][completion] = old[learned]
        trainer.model.zero_grad(set_to_none=True)
        policy.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        _, our_loss = ours(x, y, advantages, old)
        our_loss.backward()
        logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        # the clip acts where asked to, and only there
        assert (logged["clip_ratio/region_mean"] > 0) == (old is not None)
        assert abs(our_loss.item() - loss.item()) <= 1e-5
        if beta:
            # as trl logs it, times the ratio
            ratio = 1.0 if old is None else torch.exp(logps - old)
            kl = (ours.kl(logps, x, y) * ratio).sum() / learned.sum()
            assert logged["kl"] > 1e-3 and abs(kl.item() - logged["kl"]) <= 1e-5
        theirs = dict(trainer.model.named_parameters())
        for name, p in policy.named_parameters():
            their_grad = theirs[trunk.hugging_face_name(name)].grad
            assert (p.grad - their_grad).abs().max() <= 1e-5, name
        assert policy.lm_head.weight.grad.abs().max() > 1e-3


def strings(length):
    return ["".join(letters) for letters in itertools.product("ab", repeat=length)]


class FirstLetter:
    """A made-up task that a random model already solves sometimes: a reply is right when it
    starts with an a and ends its turn. Its problems are strings of a and b: those of 2 and 3
    letters to train on, the 16 of 4 letters to measure on."""

    name = "first letter"
    reply_tokens = 3
    train = strings(2) + strings(3)
    val = strings(4)

    def messages(self, problem):
        return [{"role": "user", "content": problem}]

    def answer(self, problem):
        return "a"

    def reward(self, problem, reply):
        return float(reply.startswith("a"))


@pytest.fixture
def tiny():
    """A small random model of ours over the letters a and b, with stage 08's template."""
    template = trunk.ChatTemplate(CharTokenizer("ab"))
    torch.manual_seed(0)
    config = trunk.GPTConfig(block_size=16, vocab_size=template.vocab_size, n_layer=1, n_head=2,
                             n_embd=16)
    return trunk.GPT(config), template


def test_rollout_learns_the_replies_only_and_rewards_those_that_ended(tiny, monkeypatch):
    model, template = tiny
    a, b = template.tokenizer.encode("ab")
    end = template.end
    user = template.ids["<|user|>"]
    # the third and the last start with an a, but one was cut at reply_tokens and the other began
    # the user's turn: no reward
    replies = [[a, end], [b, end], [a, a, a], [end], [a, b, end], [a, user, end]]
    monkeypatch.setattr(grpo, "sample_replies", lambda *args: replies)
    problems = ["ab", "bab"]
    flags = types.SimpleNamespace(group_size=3)
    x, y, rewards = grpo.rollout(model, FirstLetter(), template, problems, flags, CPU)
    assert rewards.tolist() == [1, 0, 0, 0, 1, 0]
    starts = [template.render(FirstLetter().messages(p), reply_next=True)[0] for p in problems]
    width = max(len(starts[row // 3]) + len(reply) for row, reply in enumerate(replies))
    for row, reply in enumerate(replies):
        ids = starts[row // 3] + reply
        # each row the prompt, the reply, then the end token as padding, learned nowhere
        assert x[row].tolist() == (ids + [end] * (width - len(ids)))[:-1]
        learned = (y[row] != -1).nonzero().flatten().tolist()
        assert learned == list(range(len(ids) - 1 - len(reply), len(ids) - 1))
        assert y[row, learned].tolist() == reply


@pytest.mark.parametrize("loss_norm", ["grpo", "dr_grpo", "dapo"])
def test_a_group_all_right_or_all_wrong_teaches_nothing(tiny, loss_norm):
    model, template = tiny
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the zero-initialized projections too
    flags = types.SimpleNamespace(group_size=G, kl_beta=0.0, clip_epsilon=EPSILON,
                                  loss_norm=loss_norm)
    x, y, _ = grpo.rollout(model, FirstLetter(), template, ["ab", "ba"], flags, CPU)
    ours = grpo.GRPO(model, None, flags, FirstLetter.reply_tokens)
    with torch.no_grad():
        old_logps = grpo.token_logps(model, x, y) + 0.5 * (y != -1)
    for scale in (False, True):
        for old in (None, old_logps):
            for rewards, teaches in (([1.0] * G + [0.0] * G, False), ([1.0, 0, 0, 0] * 2, True)):
                advantages = grpo.group_advantages(torch.tensor(rewards), G, scale)
                assert (advantages != 0).any() == teaches
                model.zero_grad(set_to_none=True)
                ours(x, y, advantages, old)[1].backward()
                largest = max(p.grad.abs().max() for p in model.parameters())
                assert (largest > 0) == teaches


def test_a_few_steps_of_rl_raise_the_held_out_reward(tiny):
    """train() of the stage, 20 steps of 4 problems x 8 replies, two updates each (the second
    through the ratio and its clip): held-out pass@1 from a few replies right to most."""
    model, template = tiny
    flags = types.SimpleNamespace(group_size=8, kl_beta=0.0, clip_epsilon=EPSILON,
                                  loss_norm="dapo", scale_rewards=False, updates=2, lr=3e-2,
                                  weight_decay=0.0, warmup_iters=0, max_iters=20, grad_clip=1.0,
                                  dtype="float32", block_size=16, eval_interval=20, eval_iters=4,
                                  batch_size=4, seed=0, world_size=1, grad_accum_steps=1)
    ours = grpo.GRPO(model, None, flags, FirstLetter.reply_tokens)
    optimizer = grpo.configure_optimizer(model, flags)
    history, _, stopped = grpo.train(ours, optimizer, FirstLetter(), template, flags, CPU, 0,
                                     [], lambda step, history: None)
    first, last = history[0], history[-1]
    assert (first["step"], last["step"], stopped) == (0, 20, None)
    assert first["val_pass@1"] < 0.1 and last["val_pass@1"] > 0.8


def test_a_diverging_run_ends_with_one_sentence(tiny):
    """At a huge learning rate the weights become NaN while the loss of the step is still
    finite: the run stops there, before it samples from them (which would fail in the
    sampler)."""
    model, template = tiny
    flags = types.SimpleNamespace(group_size=8, kl_beta=0.0, clip_epsilon=EPSILON,
                                  loss_norm="dapo", scale_rewards=False, updates=1, lr=1e20,
                                  weight_decay=0.0, warmup_iters=0, max_iters=30, grad_clip=1.0,
                                  dtype="float32", block_size=16, eval_interval=30, eval_iters=1,
                                  batch_size=4, seed=0, world_size=1, grad_accum_steps=1)
    ours = grpo.GRPO(model, None, flags, FirstLetter.reply_tokens)
    optimizer = grpo.configure_optimizer(model, flags)
    with pytest.raises(UserError, match=r"the (weights|loss) became (inf or NaN|nan|inf) at step "
                       r"\d+: training diverged; try a smaller --lr"):
        grpo.train(ours, optimizer, FirstLetter(), template, flags, CPU, 0, [],
                   lambda step, history: None)


def test_backwards_rewards_the_word_backwards_and_nothing_else(backwards):
    assert [backwards.reward("fair", reply) for reply in
            ("riaf", "fair", "Riaf", "riaf ", " riaf", "ria", "")] == [1, 0, 0, 0, 0, 0, 0]
    # any one letter wrong, the last too
    wrong = ("xiaf", "rxaf", "rixf", "riax")
    assert [backwards.reward("fair", reply) for reply in wrong] == [0] * 4
    assert backwards.answer("fair") == "riaf"
    assert len(backwards.val) == 300 and not set(backwards.train) & set(backwards.val)
    words = backwards.train + backwards.val
    assert len(set(words)) == len(words)
    assert all(3 <= len(word) <= 5 and word.isalpha() and word.islower() for word in words)
    # the same split every run
    assert grpo.Backwards(types.SimpleNamespace(data=None)).val == backwards.val


@pytest.mark.parametrize("answer, reply, right", [
    ("She sold 48 + 24 = 72.\n#### 72", "48 + 24 = 72 clips.\n#### 72", True),
    ("#### 72", "####72.", True),
    ("#### 72", "#### 72\nand that is all", True),
    ("#### 72", "She sold 72 clips.", False),  # no ####
    ("#### 72", "#### 73", False),
    ("#### 72", "#### 720", False),
    ("#### 72", "#### 72, or rather\n#### 70", False),  # the last #### counts
    ("#### 72", "#### 70, or rather\n#### 72", True),
    ("#### 1,200", "#### 1200", True),  # commas left out
    ("#### 1200", "#### 1,200", True),
    ("#### -5", "#### -5", True),
    ("#### -5", "#### 5", False),
    ("#### 2.5", "#### 2.5", True),
    ("#### 18", "#### $18.00", True),  # a dollar sign and cents read as the number
])
def test_gsm8k_rewards_the_number_after_the_last_marks(tmp_path, answer, reply, right):
    problem = {"question": "How many clips did Natalia sell?", "answer": answer}
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [json.dumps(problem)] * 2)
    task = grpo.GSM8K(types.SimpleNamespace(data=data))
    assert task.reward(task.train[0], reply) == float(right)


def test_final_number():
    assert grpo.final_number("so 3 + 4 = 7\n#### 1,234,567") == 1234567
    assert grpo.final_number("#### -12") == -12
    assert grpo.final_number("#### 7 and #### 8") == 8
    assert grpo.final_number("The answer is 7.") is None
    assert grpo.final_number("#### seven") is None


GOOD = json.dumps({"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"})


def test_gsm8k_reads_its_problems_and_keeps_a_tenth_for_measuring(tmp_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [GOOD] * 20 + [""])
    task = grpo.GSM8K(types.SimpleNamespace(data=data))
    assert (len(task.train), len(task.val)) == (18, 2)
    [message] = task.messages(task.val[0])
    assert message["role"] == "user" and message["content"].startswith("What is 6 times 7?\n")
    assert "####" in message["content"]


@pytest.mark.parametrize("line", [
    "{not json",
    json.dumps(["What is 6 times 7?", "#### 42"]),
    json.dumps({"question": "What is 6 times 7?"}),
    json.dumps({"question": "What is 6 times 7?", "answer": "42"}),  # no ####
    json.dumps({"question": "What is 6 times 7?", "answer": 42}),
    json.dumps({"question": 42, "answer": "#### 42"}),
])
def test_bad_gsm8k_lines_get_one_sentence_naming_the_line(tmp_path, capsys, line):
    """Found before any model is loaded: --init-from names none that exists."""
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [GOOD, line, GOOD])
    err = stage_error(capsys, grpo.main, "--task", "gsm8k", "--data", data, "--init-from",
                      str(tmp_path / "no model"), "--out", str(tmp_path / "run"))
    assert f"--data {data}, line 2: not a GSM8K problem" in err


def test_gsm8k_needs_two_problems_and_backwards_no_data(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [GOOD, ""])
    model = str(tmp_path / "no model")
    assert "has fewer than two problems" in stage_error(
        capsys, grpo.main, "--task", "gsm8k", "--data", data, "--init-from", model)
    assert "--task backwards makes its own" in stage_error(
        capsys, grpo.main, "--data", data, "--init-from", model)


def test_grpo_of_a_hugging_face_model_on_gsm8k_with_adapters_then_merged_and_exported(
        folders, tmp_path, capsys):
    """The whole stage on a Hugging Face model, as its command line runs it: GSM8K's problems from
    a file, adapters, a few steps with their evaluations; then the adapters merged into a
    save_pretrained folder that transformers loads with our logits."""
    _, policy = folders
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [GOOD] * 10)
    out = tmp_path / "run"
    grpo.main(["--init-from", str(policy), "--task", "gsm8k", "--data", data, "--lora-rank", "4",
               "--group-size", "2", "--batch-size", "1", "--max-iters", "2", "--eval-interval",
               "2", "--eval-iters", "1", "--max-new-tokens", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "GRPO on gsm8k: 9 train problems, 1 val" in printed
    assert "held-out pass@1 0.000 before RL (step 0), 0.000 after (step 2)" in printed
    grpo.main(["--merge", "--out", str(out)])
    model, _ = grpo.load_model(out)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    x = torch.randint(320, (2, 24))
    with torch.no_grad():
        assert (model.eval()(x)[0] - exported(x).logits).abs().max() <= 1e-5


def test_the_progress_line_counts_the_replies_a_step_samples(monkeypatch):
    """Stage 09's line (tests/test_stages.py has its cases), with replies a second in place of
    tokens: 8 to each of 8 problems a step, 100 steps in 10 s."""
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    args = types.SimpleNamespace(batch_size=8, group_size=8, grad_accum_steps=1, world_size=1,
                                 max_iters=1000, eval_interval=100)
    line = grpo.progress(200, args, (100, 980.0, 20.0), 30.0, 3)
    assert line == " | 100.0 ms/step, 640 replies/s, 0:02:40 left"


def train_flags(**changes):
    """The flags of a few steps of train() on FirstLetter, over changes."""
    flags = dict(group_size=8, kl_beta=0.0, clip_epsilon=EPSILON, loss_norm="dapo",
                 scale_rewards=False, updates=1, lr=3e-2, weight_decay=0.0, warmup_iters=0,
                 max_iters=2, grad_clip=1.0, dtype="float32", block_size=16, eval_interval=100,
                 eval_iters=1, batch_size=4, seed=0, world_size=1, grad_accum_steps=1)
    return types.SimpleNamespace(**{**flags, **changes})


def run_train(model, template, flags):
    ours = grpo.GRPO(model, None, flags, FirstLetter.reply_tokens)
    optimizer = grpo.configure_optimizer(model, flags)
    return grpo.train(ours, optimizer, FirstLetter(), template, flags, CPU, 0, [],
                      lambda step, history: None)


@pytest.mark.parametrize("scale", [False, True])
def test_train_divides_the_advantages_by_the_groups_std_as_asked(tiny, monkeypatch, scale):
    model, template = tiny
    asked = []

    def advantages(rewards, group_size, scale):
        asked.append(scale)
        return group_advantages(rewards, group_size, scale)

    group_advantages = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", advantages)
    run_train(model, template, train_flags(scale_rewards=scale))
    assert asked == [scale, scale]


def test_a_second_update_measures_its_ratio_against_the_model_that_sampled(tiny, monkeypatch):
    """With --updates 2 each update is given the log-probabilities of the model that sampled the
    replies: the first update's ratio is 1, the second's is not (the first moved the model)."""
    model, template = tiny
    ratios = []
    forward = grpo.GRPO.forward

    def recorded(self, x, y, advantages, old_logps=None):
        assert old_logps is not None
        with torch.no_grad():
            now = grpo.token_logps(self.policy, x, y)
        ratios.append((now - old_logps).abs().max().item())
        return forward(self, x, y, advantages, old_logps)

    monkeypatch.setattr(grpo.GRPO, "forward", recorded)
    run_train(model, template, train_flags(updates=2, max_iters=1))
    assert len(ratios) == 2 and ratios[0] < 1e-5 and ratios[1] > 1e-3


def test_evaluations_sample_held_out_problems_only(tiny, monkeypatch):
    model, template = tiny
    asked = []
    rollout = grpo.rollout

    def recorded(model, task, template, problems, *rest):
        asked.extend(problems)
        return rollout(model, task, template, problems, *rest)

    monkeypatch.setattr(grpo, "rollout", recorded)
    # no step: the run's one evaluation
    run_train(model, template, train_flags(max_iters=0, eval_iters=2))
    assert asked and set(asked) <= set(FirstLetter.val)


@pytest.mark.parametrize("stage, defaults", [
    ("10_dpo", dict(dpo_beta=0.1, sft_weight=1.0, lora_rank=0, batch_size=16, max_iters=90)),
    ("11_grpo", dict(group_size=8, clip_epsilon=0.2, scale_rewards=False, loss_norm="dapo",
                     updates=1, kl_beta=0.0, lora_rank=0, task="backwards", temperature=0.0,
                     batch_size=16, max_iters=600))])
def test_the_flags_defaults_are_the_measured_ones(stage, defaults, tmp_path):
    args = load_stage(stage).parse_flags(["--out", str(tmp_path)])
    assert {name: getattr(args, name) for name in defaults} == defaults


# ---------------------------------------------------------------- on its command line, as a user

def test_its_chat_answers_each_question_on_its_own_and_greedily(backwards_base, monkeypatch,
                                                                capsys):
    """As RL asked them: a question after another is answered as it would be alone (the
    conversation is not kept, which read a first question as context for the next), and at
    temperature 0 by default, the likeliest answer."""

    def answers(*questions):
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(q + "\n" for q in questions)))
        grpo.main(["--chat", "--init-from", str(backwards_base), "--max-new-tokens", "12"])
        lines = capsys.readouterr().out.splitlines()
        # each question as the prompt shows it, then the reply
        asked = [k for k, line in enumerate(lines) if line.startswith("> ") and line[2:]]
        assert [lines[k][2:] for k in asked] == list(questions)
        return [lines[k + 1] for k in asked]

    together = answers("fair backwards", "king backwards", "fair backwards")
    assert together == [*answers("fair backwards"), *answers("king backwards"), together[0]]


def test_questions_that_leave_no_room_for_a_reply_are_refused(base, tmp_path, capsys):
    flags = [*quick_flags("11_grpo", tmp_path, base / "chat"), "--block-size", "4"]
    message = stage_error(capsys, grpo.main, *flags)
    assert "no train problem's question leaves a reply room in --block-size 4 tokens" in message
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_model_that_is_no_chat_model_yet_is_refused(base, tmp_path, capsys):
    message = stage_error(capsys, grpo.main, *quick_flags("11_grpo", tmp_path, base))
    assert f"{base} holds a model with no chat template yet (07_modern.py, step 6)" in message


def test_no_kl_penalty_can_be_asked_for_as_it_is_the_default(tmp_path):
    assert grpo.parse_flags(["--kl-beta", "0", "--out", str(tmp_path)]).kl_beta == 0


def test_gsm8k_offline_without_data_is_one_sentence_at_once(tmp_path):
    """No network (a proxy that refuses connections): the hub is asked once, with a short
    timeout, not for half a minute of retries."""
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    start = time.time()
    result = subprocess.run([sys.executable, "11_grpo.py", "--task", "gsm8k", "--init-from",
                             str(tmp_path / "no model"), "--out", str(tmp_path / "run")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and time.time() - start < 10
    assert result.stderr.splitlines() == [
        "11_grpo.py: error: could not load openai/gsm8k from the Hugging Face hub: "
        "https://huggingface.co cannot be reached from here; give its problems with --data"]
