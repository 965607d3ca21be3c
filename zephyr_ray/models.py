"""Model and tokenizer loading, the Zephyr chat template, and the tiny random model for tests and demos.

The real path is ``from_pretrained`` on a directory or hub id; ``build_tiny`` writes such a directory
(real Mistral architecture, random init, a byte-level BPE tokenizer trained here) so everything runs
offline with the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Zephyr's format; {% generation %} marks what the model is trained to say (content + EOS).
ZEPHYR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

TINY_VOCAB = 2048
TINY_ARCH = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token and a chat template that marks assistant spans."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        # Base models (Mistral-7B-v0.1) have none: Zephyr's template is the recipe's. Its role markers
        # stay plain text (as in zephyr-7b-beta's tokenizer), so the vocabulary and embeddings match.
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: Any = None, attn_implementation: str = "sdpa", revision: str | None = None,
               trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or torch.float32,
        attn_implementation=attn_implementation,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )


def _tokenizer_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the sample dialogues plus every printable ASCII char."""
    from zephyr_ray.data.samples import sample_dialogues

    texts = [m["content"] for d in sample_dialogues(512, seed=0) for m in d["messages"]]
    texts.append("".join(chr(c) for c in range(32, 127)))
    return texts


def build_tiny(out_dir: str | Path, seed: int = 0) -> str:
    """Write a tiny random-init Mistral model + tokenizer to ``out_dir``; same seed, same bytes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", *ROLE_TOKENS]
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=TINY_ARCH["max_position_embeddings"],
        chat_template=ZEPHYR_CHAT_TEMPLATE,
    )
    tok.save_pretrained(out)

    config = MistralConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        sliding_window=None,
        tie_word_embeddings=False,
        **TINY_ARCH,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def resolve_model_path(path: str | None, output_dir: str | Path, seed: int = 0) -> str:
    """``path`` when given; otherwise the tiny model, built once under ``output_dir``."""
    if path:
        return path
    tiny = Path(output_dir) / "tiny-base"
    if not (tiny / "config.json").exists():
        log.info("model.path is empty: building the tiny random model in %s", tiny)
        build_tiny(tiny, seed=seed)
    return str(tiny.absolute())  # Ray workers may run in another directory
