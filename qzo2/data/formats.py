"""Row formats (text, prompt/completion, messages, alpaca) checked and tokenized into (input_ids, labels), labels
IGNORE (-100) where no loss is taken; chat rows through the tokenizer's chat template."""
from __future__ import annotations

import warnings

from .sources import DataError, read_rows

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# row format -> (required keys, optional keys); a row's keys must match exactly one format
FORMATS = {
    "text": ({"text"}, set()),
    "prompt_completion": ({"prompt", "completion"}, set()),
    "messages": ({"messages"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
}


def row_format(row) -> str:
    """Which of FORMATS the row is; DataError says what is wrong when it is none (or not a well-typed one)."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}")
    keys = set(row)
    matches = [name for name, (req, _) in FORMATS.items() if keys & req]
    if len(matches) != 1:
        what = "ambiguous keys" if matches else "unknown keys"
        raise DataError(f"{what} {sorted(keys)}; expected one of: text | prompt+completion | messages | "
                        f"instruction+output(+input)")
    name = matches[0]
    required, optional = FORMATS[name]
    if missing := sorted(required - keys):
        raise DataError(f"{name} row is missing field(s) {missing}")
    if unknown := sorted(keys - required - optional):
        raise DataError(f"{name} row has unknown field(s) {unknown}")
    if name == "messages":
        _check_messages(row["messages"])
    else:
        for key in keys:
            if not isinstance(row[key], str):
                raise DataError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
        if name == "text" and not row["text"]:
            raise DataError("field 'text' is empty")
    return name


def _check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"messages[{i}] has role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("'messages' has no assistant turn to train on")


def _encode_prompt(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(special prefix the tokenizer adds, e.g. [BOS]; tokens of text). A trailing EOS the tokenizer would add
    to a single sequence is dropped: the prompt is continued, not ended."""
    enc = tokenizer(text, return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    if ids and special[-1] and ids[-1] == tokenizer.eos_token_id:
        ids, special = ids[:-1], special[:-1]
    n = 0
    while n < len(ids) and special[n]:
        n += 1
    return ids[:n], ids[n:]


def _encode_piece(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _encode_piece(tokenizer, text)  # the chat template writes its own BOS where the model wants one


def _chat_ids(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """(ids of the rendered conversation, mask of assistant-turn tokens). Assistant turn i spans
    [len(render(messages[:i], generation prompt)), len(render(messages[:i+1]))): the template's end-of-turn
    token is inside the span, the next header is not. Needs a template whose renderings extend each other."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("a 'messages' row needs a tokenizer with a chat template")
    ids = _render(tokenizer, messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True)
        end = _render(tokenizer, messages[: i + 1], False)
        if end[: len(start)] != start or ids[: len(end)] != end:
            raise DataError("the chat template does not render the conversation incrementally (a turn changes "
                            "how earlier turns render), so assistant tokens cannot be located")
        mask[len(start): len(end)] = [True] * (len(end) - len(start))
    return ids, mask


def encode_prompt_and_candidates(tokenizer, prompt: str, candidates: list[str]):
    """(special prefix, prompt tokens, [candidate tokens]) with each candidate's tokens as they come out when the
    prompt and the candidate are tokenized together: ids(prompt + c) minus the prompt's ids, as lm-evaluation-harness
    splits a (context, continuation) pair. A SentencePiece tokenizer with a dummy prefix (Llama-2's hub
    tokenizer.json) encodes " great" alone as ['▁', '▁great'] and "Yes" alone as ['▁Yes'], but in context as
    ['▁great'] and ['Yes'] after a newline. Where the joint encoding does not start with the prompt's own tokens (a
    merge across the boundary) the candidate is encoded alone."""
    prefix, body = _encode_prompt(tokenizer, prompt)
    cands = []
    for c in candidates:
        joint_prefix, joint = _encode_prompt(tokenizer, prompt + c)
        if joint_prefix == prefix and len(joint) > len(body) and joint[: len(body)] == body:
            cands.append(joint[len(body):])
        else:
            cands.append(_encode_piece(tokenizer, c))
    return prefix, body, cands


def tokenize_row(row: dict, tokenizer, max_length: int, train_on_prompt: bool = False) -> dict | None:
    """One row -> dict(input_ids, labels), labels IGNORE (-100) outside the trained part, or None when truncation
    leaves nothing to train on.

    Formats (detected by keys): {"text"} trains on the whole text; {"prompt","completion"} and alpaca
    {"instruction","input"?,"output"} (standard alpaca template, with or without input) train on the completion
    / output; {"messages": [{"role","content"}, ...]} is rendered with the tokenizer's chat template and trains on
    the assistant turns. BOS is whatever the tokenizer (or chat template) adds; EOS, when the tokenizer has one,
    is appended after the text / completion / output (chat turns end as their template ends them).
    train_on_prompt=True puts the loss on every token instead (except the BOS the tokenizer adds).

    Truncation: the first max_length tokens are kept. A row is dropped (None) when no trained token survives
    at a position >= 1 (position 0 is never predicted), e.g. a prompt of max_length tokens or more.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    fmt = row_format(row)
    if fmt == "messages":
        ids, trained = _chat_ids(tokenizer, row["messages"])
        loss_on = [True] * len(ids) if train_on_prompt else trained
    else:
        if fmt == "text":
            prompt, completion = "", row["text"]
        elif fmt == "prompt_completion":
            prompt, completion = row["prompt"], row["completion"]
        else:
            template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
            completion = row["output"]
        # the completion's tokens are those it gets after the prompt (the same rule as encode_candidates)
        prefix, body, (completion_ids,) = encode_prompt_and_candidates(tokenizer, prompt, [completion])
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        completion_ids = completion_ids + eos
        ids = prefix + body + completion_ids
        trained = [False] * (len(prefix) + len(body)) + [True] * len(completion_ids)
        loss_on = [False] * len(prefix) + [True] * (len(ids) - len(prefix)) if train_on_prompt else trained
    ids, trained, loss_on = ids[:max_length], trained[:max_length], loss_on[:max_length]
    if not any(trained[1:]):
        return None
    return dict(input_ids=ids, labels=[t if on else IGNORE for t, on in zip(ids, loss_on)])


def check_text_rows(rows: list[tuple[str, object]], source) -> list[tuple[str, dict]]:
    """Every (location, row) checked by row_format (no tokenizer needed, so a bad file fails before a model is
    loaded); DataError names the location (file and line, list index or row) and the problem."""
    for where, row in rows:
        try:
            row_format(row)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return rows


def read_text_rows(path, split: str = "train", columns: str | dict = "") -> list[tuple[str, dict]]:
    """(location, row) for every row of a text data source (read_rows), each checked by row_format."""
    return check_text_rows(read_rows(path, split, columns), path)


def tokenize_rows(rows: list[tuple[str, dict]], tokenizer, max_length: int, train_on_prompt: bool = False,
                  source="data") -> list[dict]:
    """read_text_rows' output through tokenize_row; rows truncated to nothing are dropped with one warning."""
    out, dropped = [], 0
    for where, row in rows:
        try:
            item = tokenize_row(row, tokenizer, max_length, train_on_prompt)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if item is None:
            dropped += 1
        else:
            out.append(item)
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} of {len(rows)} rows whose trained tokens were all truncated "
                      f"away at max_length={max_length}", stacklevel=2)
    if not out:
        raise DataError(f"{source}: no usable rows")
    return out


def load_text_dataset(path, tokenizer, max_length: int, train_on_prompt: bool = False) -> list[dict]:
    """Every row of a .jsonl/.json file through tokenize_row. A bad row raises DataError naming file, line (or
    list index) and the problem; rows truncated to nothing are dropped with one warning giving their count."""
    return tokenize_rows(read_text_rows(path), tokenizer, max_length, train_on_prompt, source=path)
