"""Shared fixtures: tiny random models of several decoder families, built from configs (never downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

TEXT = " ".join(
    "the quick brown fox jumps over the lazy dog while a quantized model reads every word of this small corpus "
    "and learns nothing at all because it is only here to train a tokenizer for the tests".split() * 3
)

# hidden 128 and ffn 256: divisible by every group size the tests use (32, 64, 128)
FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    "gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                   sliding_window=64),
    "opt": dict(model_type="opt", hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=128, max_position_embeddings=256, enable_bias=True, do_layer_norm_before=True),
}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def build_model(family: str = "llama", vocab_size: int = 320, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    kw.update(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases, so bias handling is exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


@pytest.fixture
def make_model_dir(tmp_path, tokenizer):
    """make_model_dir(family, **config_overrides) -> (path, model): a saved HF directory (safetensors + tokenizer)."""

    def make(family: str = "llama", name: str | None = None, **overrides):
        model = build_model(family, vocab_size=len(tokenizer) + 20, **overrides)
        path = tmp_path / (name or f"{family}-src")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path, model

    return make


def input_ids(batch: int = 2, seq: int = 12, vocab: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make_tiny(root, tokenizer):
    """(quantized dir, unquantized dir, train jsonl of 4 prompt/completion rows) for a tiny Llama, under root."""
    import json

    from quant.checkpoint import atomic_dir, open_source, quantize
    from quant.format import QuantConfig

    src = root / "llama-src"
    build_model("llama", vocab_size=len(tokenizer) + 20).save_pretrained(src)
    tokenizer.save_pretrained(src)
    q = root / "q"
    with atomic_dir(q) as tmp:
        quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
    words = TEXT.split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "completion": " " + " ".join(words[i + 4:i + 8])} for i in range(0, 32, 8)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return q, src, data


@pytest.fixture
def tiny(tmp_path, tokenizer):
    """(quantized dir, unquantized dir, train jsonl) for a tiny Llama."""
    return make_tiny(tmp_path, tokenizer)


def train_config(tmp_path, model, data, **kw):
    """A small TrainConfig for the tiny models: text data, 40 steps, dev = train, run dir under tmp_path."""
    from qzo2.config import TrainConfig

    base = dict(model=str(model), task="", train_file=str(data), dev_file=str(data), steps=40, batch_size=4, lr=1e-3,
                eps=1e-3, max_length=32, eval_every=20, save_every=10, log_every=5, output_dir=str(tmp_path / "run"),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def patch_losses(monkeypatch, hook):
    """Wrap the loss every method computes (objective.chunk_sums, the chunks' loss sums): hook(call number from 1,
    sums) -> sums, e.g. to send a signal in a given step or to make its loss NaN. Returns the call counter."""
    from qzo2 import objective

    real = objective.chunk_sums
    calls = {"n": 0}

    def wrapped(*args):
        calls["n"] += 1
        sums, counts = real(*args)
        return hook(calls["n"], sums), counts

    monkeypatch.setattr(objective, "chunk_sums", wrapped)
    return calls


def signal_at(call: int, signum: int):
    """A patch_losses hook that sends `signum` to this process during the given loss call."""
    import os

    def hook(n, losses):
        if n == call:
            os.kill(os.getpid(), signum)
        return losses

    return hook


def nan_at(*calls: int, from_call: int | None = None):
    """A patch_losses hook making the losses of the given calls (and of every call >= from_call) NaN."""

    def hook(n, losses):
        return losses * float("nan") if n in calls or (from_call is not None and n >= from_call) else losses

    return hook


def straight_and_resumed(tmp_path, model, data, steps: int, stop_at: int, files=("trained.safetensors",),
                         calls_before: int = 0, **kw):
    """Train `steps` straight (run a), and again stopped by Ctrl-C in step `stop_at` then resumed (run b); assert
    the last checkpoints' `files` are bit-identical. `calls_before`: loss calls a run makes before its first step
    (a Fisher pass). -> (result a, result b)."""
    import signal

    from safetensors.torch import load_file

    from qzo2 import trainer

    straight = trainer.train(train_config(tmp_path / "a", model, data, steps=steps, **kw))
    with pytest.MonkeyPatch.context() as mp:
        patch_losses(mp, signal_at(calls_before + stop_at, signal.SIGINT))
        assert trainer.train(train_config(tmp_path / "b", model, data, steps=steps, **kw)).step == stop_at
    resumed = trainer.train(train_config(tmp_path / "b", model, data, steps=steps, **kw))
    for f in files:
        ta, tb = (load_file(str(trainer.RunDir(r.run).checkpoint("last") / f)) for r in (straight, resumed))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    return straight, resumed
