"""One idea per stage: each diff between consecutive stages within its budget, the definitions
the new idea does not touch the same character for character, main's steps in the same order."""
import ast
import itertools

import pytest

from conftest import ALL_STAGES, ROOT
from shared.site import changed_tokens

PAIRS = list(itertools.pairwise(ALL_STAGES))
# The most each diff may change, in tokens (changed_tokens): about 10% over its size, so that an
# idea can't grow unnoticed. Raise one only for its idea, and say why in the commit.
BUDGETS = {("01_bigram", "02_single_head"): 610, ("02_single_head", "03_multi_head"): 250,
           ("03_multi_head", "04_block"): 510, ("04_block", "05_gpt"): 3430,
           ("05_gpt", "06_train_for_real"): 4300, ("06_train_for_real", "07_modern"): 2720,
           # 3,450 until --pretrain-data and HellaSwag's encoding through the chat template
           ("07_modern", "08_chat"): 3550,
           # the 2,000 that stage 09's idea was given
           ("08_chat", "09_lora"): 2000}
# the loop of 01-04, whole
COMMON = ["estimate_loss", "progress", "check_finite", "train", "generate"]
# The definitions each stage takes over from the one before without changing a character.
UNCHANGED = {
    ("01_bigram", "02_single_head"): COMMON,
    ("02_single_head", "03_multi_head"): COMMON + ["Head"],
    ("03_multi_head", "04_block"): COMMON,
    # the recipe changes train
    ("04_block", "05_gpt"): ["estimate_loss", "progress", "check_finite"],
    # PRESETS gains gpt2-10b, GPT-2 124M trained for real
    ("05_gpt", "06_train_for_real"): ["GPTConfig", "KVCache", "CausalSelfAttention",
                                      "causal_attention_weights", "MLP", "Block", "resolve_dtype",
                                      "autocast", "configure_optimizer", "learning_rate",
                                      "check_finite", "greedy", "top_k_filter", "top_p_filter",
                                      "sample_next", "generate"],
    ("06_train_for_real", "07_modern"): ["estimate_loss", "progress", "check_finite",
                                         "resolve_dtype", "autocast", "train_step", "StopOnSignal",
                                         "train", "rng_states", "set_rng_state",
                                         "save_checkpoint", "read_checkpoint",
                                         "model_from_checkpoint", "check_resumable",
                                         "load_checkpoint", "greedy", "top_k_filter",
                                         "top_p_filter", "sample_next", "checkpoint_path",
                                         "starting_checkpoint", "trained_at",
                                         "start_processes", "describe", "train_everywhere",
                                         "print_samples"],
    # the model and the training loop are 07's; the data, the loss and the sampling change
    ("07_modern", "08_chat"): ["GPTConfig", "PRESETS", "KVCache", "rope_table", "rotate",
                               "CausalSelfAttention", "causal_attention_weights", "MLP", "Block",
                               "unsupported", "estimate_loss", "progress", "check_finite",
                               "resolve_dtype", "autocast", "Optimizers", "configure_optimizer",
                               "learning_rate", "train_step", "StopOnSignal", "train",
                               "rng_states", "set_rng_state", "save_checkpoint",
                               "model_from_checkpoint", "check_resumable", "greedy",
                               "top_k_filter", "top_p_filter", "sample_next", "checkpoint_path",
                               "trained_at", "start_processes", "describe"],
    # LoRA changes what trains, and what a checkpoint holds; the rest is 08's
    ("08_chat", "09_lora"): ["GPTConfig", "PRESETS", "RECIPES", "KVCache", "rope_table", "rotate",
                             "CausalSelfAttention", "causal_attention_weights", "MLP", "Block",
                             "unsupported", "hugging_face_name", "grow_vocabulary",
                             "ChatTemplate", "fit", "fine_tuning_data", "get_batch",
                             "estimate_loss", "progress", "check_finite", "resolve_dtype",
                             "autocast", "Optimizers", "learning_rate", "train_step",
                             "StopOnSignal", "train", "rng_states", "set_rng_state",
                             "model_from_checkpoint", "greedy", "top_k_filter", "top_p_filter",
                             "sample_next", "generate", "stream", "chat", "checkpoint_path",
                             "starting_checkpoint", "trained_at", "start_processes",
                             "sample_only", "load_text", "make_model", "train_everywhere",
                             "leave_together", "print_samples", "demo", "pretrain",
                             "train_model"],
}
# main's steps, in this order, in every stage
SKELETON = ["parse_args", "select_device", "load_dataset", "build_model", "train", "save_metrics",
            "plot_attention", "generate"]


def definitions(name):
    """The source of each top-level function, class and constant of a stage, by name."""
    source = (ROOT / f"{name}.py").read_text()
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.parse(source).body:
        # its lines whole (ast.get_source_segment splits the whole file again at every call)
        segment = "".join(lines[node.lineno - 1:node.end_lineno])
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = segment
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = segment
    return found


def main_calls(name):
    """The names of the functions main() calls in order, each function of the stage's own that it
    calls (a step such as load_text) followed by the calls inside it, and so on down."""
    found = definitions(name)

    def calls(function, inside=()):
        tree = ast.parse(found[function])
        nodes = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        named = sorted((c.lineno, c.col_offset, c.attr if isinstance(c, ast.Attribute) else c.id)
                       for c in nodes if isinstance(c, (ast.Name, ast.Attribute)))
        steps = []
        for *_, called in named:
            # the stage's own helpers, not the steps themselves (train, generate)
            own = called in found and found[called].startswith("def ") and called not in SKELETON
            if own and called not in inside:
                steps += [called, *calls(called, (*inside, function))]
            else:
                steps.append(called)
        return steps

    return calls("main")


def test_every_pair_of_consecutive_stages_has_a_budget():
    assert set(BUDGETS) == set(PAIRS) == set(UNCHANGED)


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_consecutive_stages_differ_only_by_their_concept(pair):
    """The whole diff stays within its budget, and what the new idea does not touch is the same,
    character for character: the training loop, the loss estimates, progress, sampling."""
    before, after = [(ROOT / f"{name}.py").read_text() for name in pair]
    changed = changed_tokens(before, after)
    assert changed <= BUDGETS[pair], (
        f"diff {pair[0]}.py {pair[1]}.py: {changed} tokens, over {BUDGETS[pair]}")
    old, new = map(definitions, pair)
    for name in UNCHANGED[pair]:
        assert new.get(name) == old[name], f"{name} changed from {pair[0]} to {pair[1]}"


@pytest.mark.parametrize("name", ALL_STAGES)
def test_main_has_the_same_skeleton_in_every_stage(name):
    calls = main_calls(name)
    # a table has none
    steps = [step for step in SKELETON if step != "plot_attention" or name != "01_bigram"]
    last = [len(calls) - 1 - calls[::-1].index(step) for step in steps]  # each step is there ...
    assert last == sorted(last), calls  # ... and the last time it comes, in the same order


def test_layout_costs_no_tokens_and_words_do():
    one_line = "x = f(a, b)  # the sum of a and b\n"
    reflowed = "x = f(a,\n      b)  # the sum of\n# a and b\n"
    assert changed_tokens(one_line, reflowed) == 0
    assert changed_tokens(one_line, "x = f(a, b)  # the sum of a and of b\n") == 1
    assert changed_tokens(one_line, "x = f(a, b, c)  # the sum of a and b\n") == 1
    assert changed_tokens(one_line, "x = g(a, b)  # the sum of a and b\n") == 2  # f out, g in
    # a string counts its words: one out, one in
    assert changed_tokens('x = f("of a and b")\n', 'x = f("of a and c")\n') == 2
