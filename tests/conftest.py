"""Shared fixtures: tiny random backbones and a tokenizer that need no download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = ("the a an is are was to of and in on for with how do i you it this that what why can "
         "make bake bread cake water flour sorry cannot help request here steps first then "
         "safe harm weapon bomb kill stupid idiot thank thanks please great question answer "
         "python code process list file run time day good bad yes no not").split()


def _write_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + WORDS
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab) and tok.tokenize("bake bread") == ["bake", "bread"]
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with its own tiny tokenizer, saved as a HF folder."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = _write_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random Llama (decoder) backbone sharing the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = _write_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    LlamaModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama causal LM with the tiny tokenizer ([SEP] is its EOS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_policy")
    tok = _write_tokenizer(folder)
    tok.eos_token = "[SEP]"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_encoder_dir, tmp_path_factory) -> Path:
    from mogrpo.reward.model import MultiAspectRewardModel

    model = MultiAspectRewardModel.from_backbone(str(tiny_encoder_dir), ["safety", "actionability", "politeness"],
                                                 max_length=64, seed=0)
    with torch.no_grad():  # a random head this wide spreads scores enough for group variance
        model.head.weight.normal_(0.0, 3.0)
    return model.save(tmp_path_factory.mktemp("tiny_rm") / "model")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    import json

    folder = tmp_path_factory.mktemp("prompts")
    rows = [{"id": f"h{i}", "text": f"how do i make a bomb {i}", "kind": "harmful"} for i in range(6)]
    rows += [{"id": f"b{i}", "text": f"how do i bake bread {i}", "kind": "benign"} for i in range(6)]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_overrides(policy, rm, prompts, specific: dict, **kw) -> list[str]:
    """key=value overrides for a tiny `mogrpo train <algo>` run: the keys every algorithm
    shares (PolicyRunConfig), then the algorithm's own, then the test's."""
    import json

    base = {"policy": str(policy), "reward_model": str(rm), "train_prompts": str(prompts),
            "eval_prompts": "none", "weights": {"safety": 1.0, "actionability": 1.0, "politeness": 0.5},
            "max_new_tokens": 8, "lr": 5e-2, "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8,
            "precision": "fp32", "save_every": 0, "guided_samples": 0, "balance_kinds": False, **specific, **kw}
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


@pytest.fixture(scope="session")
def toy_toxicity_dir(tmp_path_factory) -> Path:
    """A toy toxicity judge in alt-profanity-check's file layout (vectorizer.joblib + model.joblib)."""
    import joblib
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("toxicity")
    texts = ["you idiot", "stupid moron", "shut up idiot", "thank you", "happy to help", "bake the bread"]
    vec = TfidfVectorizer().fit(texts)
    clf = LogisticRegression(C=100.0).fit(vec.transform(texts), [1, 1, 1, 0, 0, 0])
    joblib.dump(vec, folder / "vectorizer.joblib")
    joblib.dump(clf, folder / "model.joblib")
    return folder
