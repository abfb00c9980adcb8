"""Conversations to fine-tune on: JSONL files of messages, Tiny Shakespeare's dialogue, and a
Hugging Face model's own chat template."""
import json

from shared import UserError
from shared.data import read_file, read_text

ROLES = ("system", "user", "assistant")


def read_conversations(path):
    """Conversations from a JSONL file, one a line as {"messages": [{"role": ..., "content": ...},
    ...]}: the format of Hugging Face chat datasets and of OpenAI's fine-tuning files. Returns the
    conversations that have an assistant turn to learn from, and how many had none (skipped)."""
    conversations, skipped = [], 0
    for number, line in enumerate(read_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = parse_conversation(line)
        except ValueError as problem:
            raise UserError(f"--data {path}, line {number}: {problem}") from None
        if any(m["role"] == "assistant" for m in messages):
            conversations.append(messages)
        else:
            skipped += 1
    if not conversations:
        raise UserError(f"--data {path} has no conversation with an assistant turn to learn from")
    return conversations, skipped


def parse_conversation(line):
    """One JSONL line's messages, each its role and content only; a ValueError saying in a few
    words what keeps the line from being a conversation."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError('not an object with a "messages" list')
    return checked_messages(record["messages"])


def checked_messages(messages, what="message"):
    """A list of messages, each its role and content only; a ValueError saying in a few words what
    keeps it from being one (what: how to name a message)."""
    if not messages:
        raise ValueError(f"no {what}s")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"{what} {i} is not an object with a role and a content")
        if message.get("role") not in ROLES:
            raise ValueError(f"{what} {i} has the role {message.get('role')!r}, "
                             f"not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{what} {i} has no text as its content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_preference(line):
    """One JSONL line in trl's conversational preference format, {"prompt": [messages], "chosen":
    [a reply], "rejected": [a reply]}: the prompt's messages and the two replies' texts; a
    ValueError saying in a few words what keeps the line from being a preference."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
    keys = ("prompt", "chosen", "rejected")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in keys):
        raise ValueError('not an object with "prompt", "chosen" and "rejected" lists')
    pair = {"prompt": checked_messages(record["prompt"], "prompt message")}
    for key in ("chosen", "rejected"):
        reply = checked_messages(record[key], f"{key} message")
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise ValueError(f'"{key}" is not one message of the assistant\'s')
        pair[key] = reply[0]["content"]
    if pair["chosen"] == pair["rejected"]:
        raise ValueError("the chosen and the rejected reply are the same: nothing to prefer")
    return pair


def read_preferences(path):
    """The pairs of a JSONL file of preferences, a line each (parse_preference): a prompt and its
    chosen and rejected replies, and the number of its line, for a later error to name."""
    pairs = []
    for number, line in enumerate(read_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append({**parse_preference(line), "line": number})
        except ValueError as problem:
            raise UserError(f"--data {path}, line {number}: {problem}") from None
    return pairs


def load_preferences(path):
    """The train and val pairs of a JSONL file of preferences (read_preferences), split 90/10 in
    the file's order."""
    pairs = read_preferences(path)
    if len(pairs) < 2:
        raise UserError(f"--data {path} holds fewer than two preference pairs; give it at least "
                        "two, for training and validation")
    n = min(int(0.9 * len(pairs)), len(pairs) - 1)
    return pairs[:n], pairs[n:]


def load_conversations(path=None):
    """The train and val conversations: a JSONL file's (read_conversations), split 90/10 in the
    file's order, or with no path Tiny Shakespeare's dialogue (shakespeare_conversations)."""
    if path is None:
        return shakespeare_conversations(read_text())
    found, skipped = read_conversations(path)
    if skipped:
        print(f"{skipped} of the conversations of {path} had no assistant turn: skipped")
    if len(found) < 2:
        raise UserError(f"--data {path} has one conversation to learn from; give it at least "
                        "two, for training and validation")
    n = min(int(0.9 * len(found)), len(found) - 1)
    return found[:n], found[n:]


def shakespeare_conversations(text):
    """Tiny Shakespeare's dialogue as conversations, split 90/10 as the text is, with the speech
    across the 90% mark left out, so that no val reply was in the train text. The play is a
    sequence of speeches, each a speaker's name and a colon on a line of its own, then the lines
    spoken, then a blank line. A conversation is a run of speeches that goes back and forth
    between the same two speakers: the first speaker is the user, the one who answers is the
    assistant; the run ends where a third speaker comes in, and a user's speech left without an
    answer at its end is dropped. Returns the train and val conversations."""
    n = int(0.9 * len(text))
    return dialogue(text[:text.rfind("\n\n", 0, n)]), dialogue(text[text.find("\n\n", n):])


def dialogue(text):
    """The conversations of shakespeare_conversations in one part of the text."""
    speeches = []
    for block in text.split("\n\n"):
        name, _, lines = block.strip().partition(":\n")
        if lines.strip():
            speeches.append((name, lines.strip()))
    runs, run = [], []
    for speaker, lines in speeches:
        # a third speaker, or the same one twice, starts a new run
        if (len(run) >= 2 and speaker != run[-2][0]) or (run and speaker == run[-1][0]):
            runs.append(run)
            run = []
        run.append((speaker, lines))
    runs.append(run)
    return [[{"role": ("user", "assistant")[i % 2], "content": lines}
             for i, (_, lines) in enumerate(run[:len(run) // 2 * 2])]
            for run in runs if len(run) >= 2]


class HuggingFaceChat:
    """A Hugging Face model's own chat template (its tokenizer's apply_chat_template) and its
    end-of-turn token: the special token its template puts right after a reply. Few templates mark
    the replies ({% generation %}), so they are found in the rendered text: each message's content
    followed by the end token, searched for in order; the tokens over a reply are learned."""

    def __init__(self, tokenizer):
        self.base = tokenizer
        self.tokenizer = tokenizer.tokenizer
        self.name = tokenizer.name
        self.vocab_size = tokenizer.vocab_size
        if not self.tokenizer.chat_template:
            raise UserError(f"{self.name!r} has no chat template: fine-tune a model that has one "
                            "(an instruct model), or one of this project's")
        probe = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"}]
        text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        if "Hi!" not in text:
            raise UserError(f"{self.name!r}'s chat template changes the text of a message, "
                            "so its replies cannot be found to learn them")
        after = text[text.rindex("Hi!") + len("Hi!"):]
        ends = [token.content for token in self.tokenizer.added_tokens_decoder.values()
                if after.startswith(token.content)]
        if not ends:
            raise UserError(f"{self.name!r}'s chat template follows a reply with {after[:20]!r}, "
                            "not a special token that could end its turn")
        self.end_text = max(ends, key=len)
        self.end = self.tokenizer.convert_tokens_to_ids(self.end_text)
        # the tokens that mark turns, which a reply's text never holds
        self.special = {i for i, token in self.tokenizer.added_tokens_decoder.items()
                        if token.special}

    def render(self, messages, reply_next=False):
        """The conversation's token ids and, for each, whether it is learned: a reply's text and
        the end token after it. reply_next adds the template's prompt for a reply."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=reply_next)
        replies, cursor = [], 0
        for message in messages:
            content = message["content"]
            if text.find(content + self.end_text, cursor) < 0:
                # Llama 3's template trims a message's text
                content = content.strip()
            start = text.find(content + self.end_text, cursor)
            if start < 0:
                raise UserError(f"{self.name!r}'s chat template changes the text of a message, "
                                "so its replies cannot be found to learn them")
            cursor = start + len(content) + len(self.end_text)
            if message["role"] == "assistant":
                replies.append((start, cursor))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        learned = [any(a < end and b > start for start, end in replies)
                   for a, b in encoded["offset_mapping"]]
        return encoded["input_ids"], learned

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def identity(self):
        return self.base.identity()
