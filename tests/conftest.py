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
            "eval_prompts": "none", "validation_prompts": "none",
            "weights": {"safety": 1.0, "actionability": 1.0, "politeness": 0.5},
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


# ----------------------------------------------------------------------------- the paper's architectures, tiny

QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_bpe_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with Qwen2.5's special tokens and chat format (trained on
    WORDS: the hub's own needs a download), saved as a Qwen2 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 3 + ["How do I bake bread? I'm sorry, but I can't help."], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN_CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_qwen2_config(vocab_size: int, **kw):
    """Qwen2.5's architecture (grouped-query attention, q/k/v biases, tied embeddings as in
    0.5B), 2 layers, 32 wide."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, **kw)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A random Qwen2ForCausalLM (Qwen2.5-Instruct's architecture) with a chat-format BPE tokenizer."""
    from transformers import Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tok = _write_bpe_tokenizer(folder)
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                       bos_token_id=None)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict[str, Path]:
    """Random encoders of the reward configs' architectures (DeBERTa-v2/v3, ModernBERT, Qwen2),
    2 layers, 32 wide, each with a tokenizer (the tiny WordPiece one; Qwen2: the BPE one)."""
    from transformers import DebertaV2Config, DebertaV2Model, ModernBertConfig, ModernBertModel, Qwen2Model

    out = {}
    for name in ("deberta-v2", "modernbert", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny_{name}")
        tok = _write_bpe_tokenizer(folder) if name == "qwen2" else _write_tokenizer(folder)
        torch.manual_seed(0)
        if name == "deberta-v2":
            model = DebertaV2Model(DebertaV2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   max_position_embeddings=1024, relative_attention=True,
                                                   position_biased_input=False, pos_att_type=["p2c", "c2p"]))
        elif name == "modernbert":
            model = ModernBertModel(ModernBertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                                     cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                                                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                                     global_attn_every_n_layers=2, local_attention=16))
        else:
            model = Qwen2Model(tiny_qwen2_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None,
                                                 eos_token_id=tok.eos_token_id))
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
