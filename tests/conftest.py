"""Shared fixtures: tiny random backbones and a tokenizer that need no download. The helpers
they are built with, and those the test modules share, are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_qwen2_config, write_bpe_tokenizer, write_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with its own tiny tokenizer, saved as a HF folder."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = write_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama (decoder) backbone sharing the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = write_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=128)
    LlamaModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama causal LM with the tiny tokenizer ([SEP] is its EOS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_policy")
    tok = write_tokenizer(folder)
    tok.eos_token = "[SEP]"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_encoder_dir, tmp_path_factory) -> Path:
    from mogrpo.reward.model import MultiAspectRewardModel

    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir),
                                                 ["safety", "actionability", "politeness"],
                                                 max_length=64, seed=0)
    with torch.no_grad():  # a random head this wide spreads scores enough for group variance
        model.head.weight.normal_(0.0, 3.0)
    return model.save(tmp_path_factory.mktemp("tiny_rm") / "model")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    import json

    folder = tmp_path_factory.mktemp("prompts")
    rows = [{"id": f"h{i}", "text": f"how do i make a bomb {i}", "kind": "harmful"}
            for i in range(6)]
    rows += [{"id": f"b{i}", "text": f"how do i bake bread {i}", "kind": "benign"}
             for i in range(6)]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def toy_toxicity_dir(tmp_path_factory) -> Path:
    """A toy toxicity judge in alt-profanity-check's file layout (vectorizer.joblib +
    model.joblib)."""
    import joblib
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("toxicity")
    texts = ["you idiot", "stupid moron", "shut up idiot", "thank you", "happy to help",
             "bake the bread"]
    vec = TfidfVectorizer().fit(texts)
    clf = LogisticRegression(C=100.0).fit(vec.transform(texts), [1, 1, 1, 0, 0, 0])
    joblib.dump(vec, folder / "vectorizer.joblib")
    joblib.dump(clf, folder / "model.joblib")
    return folder


# ------------------------------------------------------------------ the paper's architectures, tiny


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A random Qwen2ForCausalLM (Qwen2.5-Instruct's architecture) with a chat-format BPE
    tokenizer."""
    from transformers import Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tok = write_bpe_tokenizer(folder)
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config(len(tok), eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id,
                                       bos_token_id=None)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict[str, Path]:
    """Random encoders of the reward configs' architectures (DeBERTa-v2/v3, ModernBERT, Qwen2),
    2 layers, 32 wide, each with a tokenizer (the tiny WordPiece one; Qwen2: the BPE one)."""
    from transformers import (
        DebertaV2Config,
        DebertaV2Model,
        ModernBertConfig,
        ModernBertModel,
        Qwen2Model,
    )

    out = {}
    for name in ("deberta-v2", "modernbert", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny_{name}")
        tok = write_bpe_tokenizer(folder) if name == "qwen2" else write_tokenizer(folder)
        torch.manual_seed(0)
        if name == "deberta-v2":
            model = DebertaV2Model(DebertaV2Config(vocab_size=len(tok), hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64,
                                                   max_position_embeddings=1024,
                                                   relative_attention=True,
                                                   position_biased_input=False,
                                                   pos_att_type=["p2c", "c2p"]))
        elif name == "modernbert":
            model = ModernBertModel(ModernBertConfig(vocab_size=len(tok), hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64,
                                                     max_position_embeddings=1024,
                                                     pad_token_id=tok.pad_token_id,
                                                     cls_token_id=tok.cls_token_id,
                                                     sep_token_id=tok.sep_token_id,
                                                     bos_token_id=tok.cls_token_id,
                                                     eos_token_id=tok.sep_token_id,
                                                     global_attn_every_n_layers=2,
                                                     local_attention=16))
        else:
            model = Qwen2Model(tiny_qwen2_config(len(tok), pad_token_id=tok.pad_token_id,
                                                 bos_token_id=None, eos_token_id=tok.eos_token_id))
        model.save_pretrained(folder)
        out[name] = folder
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
