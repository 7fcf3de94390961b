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
