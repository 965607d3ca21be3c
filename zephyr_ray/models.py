"""Model and tokenizer loading, the Zephyr chat template, and the tiny random model for tests and demos.

The real path is ``from_pretrained`` on a directory or hub id; ``build_tiny`` writes such a directory
(a real architecture: Mistral by default, or Llama, Falcon, MPT, GPT-NeoX, Qwen2, Gemma; random init; a
byte-level BPE tokenizer trained here) so everything runs offline with the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from zephyr_ray.gguf_import import resolve as resolve_gguf
from zephyr_ray.synthetic import sample_dialogues
from zephyr_ray.templates import END_OF_TURN, read_chat_template

log = logging.getLogger(__name__)

# Zephyr's format (templates/zephyr.jinja); {% generation %} marks what the model is trained to say (content + EOS).
ZEPHYR_CHAT_TEMPLATE = read_chat_template("zephyr")
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# torch dtype name of each precision setting (train.precision, engine.precision), for every loader.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

TINY_VOCAB = 2048
TINY_MAX_POSITIONS = 4096
# The tiny model of every supported base-model family: the family's own config class, same budget
# (hidden 128, 2 layers, 4 heads, MLP 384: 0.4-0.7M parameters), only the key names differ.
TINY_ARCH = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": TINY_MAX_POSITIONS,
}
_UNTIED = {"tie_word_embeddings": False}
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", {**TINY_ARCH, **_UNTIED, "sliding_window": None}),
    "llama": ("LlamaConfig", {**TINY_ARCH, **_UNTIED}),
    # Falcon-7B's layout: multi-query attention, parallel attention + MLP, rotary, tied embeddings.
    "falcon": ("FalconConfig", {"hidden_size": 128, "ffn_hidden_size": 384, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "multi_query": True, "parallel_attn": True,
                                "new_decoder_architecture": False, "alibi": False, "bias": False,
                                "max_position_embeddings": TINY_MAX_POSITIONS}),
    # MPT-7B's: ALiBi (no position embeddings, no position_ids), no biases, tied embeddings.
    "mpt": ("MptConfig", {"d_model": 128, "expansion_ratio": 3, "n_layers": 2, "n_heads": 4,
                          "max_seq_len": TINY_MAX_POSITIONS}),
    # RedPajama-INCITE's: rotary, parallel residual, untied embeddings.
    "gpt_neox": ("GPTNeoXConfig", {**{k: v for k, v in TINY_ARCH.items() if k != "num_key_value_heads"},
                                   **_UNTIED, "use_parallel_residual": True}),
    "qwen2": ("Qwen2Config", {**TINY_ARCH, **_UNTIED}),
    "gemma": ("GemmaConfig", {**TINY_ARCH, "head_dim": 32}),  # tied embeddings, as Gemma's
}
TINY_FAMILY_NAMES = tuple(TINY_FAMILIES)

# Chat templates with no system role (Gemma's raises on one): the system message is folded into the
# first user turn, as Gemma's documentation advises, so system prompts (AIF, eval judges, serving clients)
# still reach the model instead of failing the request. Prepended to the tokenizer's own template.
_FOLD_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages | length > 1 and messages[1]['role'] == 'user' -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\n\n' + messages[1]['content']}]"
    " + messages[2:] -%}"
    "{%- else -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content']}] + messages[1:] -%}"
    "{%- endif -%}"
    "{%- endif -%}"
)
_SYSTEM_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
TEMPLATE_OWN, TEMPLATE_FOLDED, TEMPLATE_ZEPHYR = "own", "own (system folded into first user turn)", "zephyr (added)"
TEMPLATE_OVERRIDE = "override: {}"  # model.chat_template / engine.chat_template


def _renders_system(tok: Any) -> bool:
    try:
        tok.apply_chat_template(_SYSTEM_PROBE, tokenize=False, add_generation_prompt=True)
        return True
    except Exception:  # noqa: BLE001 - templates raise anything (TemplateError, their raise_exception)
        return False


def _fit_chat_template(tok: Any) -> str:
    """Give ``tok`` a usable chat template in place; returns where it came from (``TEMPLATE_*``)."""
    if not tok.chat_template:
        # Base models (Mistral-7B-v0.1) have none: Zephyr's template is the recipe's. Its role markers
        # stay plain text (as in zephyr-7b-beta's tokenizer), so the vocabulary and embeddings match.
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE
        return TEMPLATE_ZEPHYR
    if not isinstance(tok.chat_template, str) or _renders_system(tok):
        return TEMPLATE_OWN
    own = tok.chat_template
    tok.chat_template = _FOLD_SYSTEM + own
    if not _renders_system(tok):  # it fails for another reason: leave the template and its error alone
        tok.chat_template = own
        return TEMPLATE_OWN
    return TEMPLATE_FOLDED


def apply_chat_template_override(tok: Any, spec: str) -> None:
    """Give ``tok`` the named template or Jinja file ``spec`` in place (system messages folded into the first user
    turn where it has no system role). A named template's end-of-turn marker (``templates.END_OF_TURN``) becomes the
    EOS token where the vocabulary has it as one token; where it has not, turns end in plain text and generation
    stops only at the model's own EOS, which is logged."""
    tok.chat_template = read_chat_template(spec)
    end = END_OF_TURN.get(spec)
    if end and end != tok.eos_token:
        if end in tok.get_vocab():
            tok.eos_token = end
        else:
            log.warning("chat template %s ends turns with %s, which is not one token of this vocabulary: generation "
                        "stops only at the EOS token %s", spec, end, tok.eos_token)
    _fit_chat_template(tok)


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """The model's tokenizer with a pad token and a chat template that marks assistant spans: ``chat_template``
    (a named template or Jinja file, ``templates``) when given, else its own (with system messages folded into
    the first user turn where it has no system role), else Zephyr's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_gguf(path), revision=revision, trust_remote_code=trust_remote_code)
    if chat_template:
        apply_chat_template_override(tok, chat_template)
    else:
        _fit_chat_template(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_template_source(tokenizer_or_path: Any, revision: str | None = None, trust_remote_code: bool = False,
                         chat_template: str | None = None) -> str:
    """Which chat template a model is trained and prompted with: ``override: <chat_template>`` when one is
    configured, else ``own``, ``own (system folded into first user turn)`` or ``zephyr (added)`` (its tokenizer has
    none). Takes a model path or a tokenizer as loaded by ``AutoTokenizer`` (not ``load_tokenizer``, which has
    already fitted it). Recorded in the pipeline manifest, so a base model that silently got Zephyr's format is
    visible."""
    if chat_template:
        return TEMPLATE_OVERRIDE.format(chat_template)
    if isinstance(tokenizer_or_path, (str, Path)):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_gguf(str(tokenizer_or_path)), revision=revision,
                                            trust_remote_code=trust_remote_code)
        return _fit_chat_template(tok)
    tok, own = tokenizer_or_path, tokenizer_or_path.chat_template
    try:
        return _fit_chat_template(tok)
    finally:
        tok.chat_template = own


def load_model(path: str, *, dtype: Any = None, attn_implementation: str = "sdpa", revision: str | None = None,
               trust_remote_code: bool = False, quantization_config: Any = None):
    """``AutoModelForCausalLM`` in ``dtype`` (fp32 by default; ``quantization_config``: bitsandbytes, for
    QLoRA). ``sdpa`` (the default) becomes ``attention.sdpa_varlen`` (SDPA per packed sequence) on families with
    transformers' attention interface, and falls back to ``eager`` for families without an SDPA implementation
    (MPT); an explicit other choice never changes."""
    import torch
    from transformers import AutoModelForCausalLM

    from zephyr_ray.attention import use_varlen_sdpa

    path = resolve_gguf(path)

    def load(attn: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation=attn,
                                                    revision=revision, trust_remote_code=trust_remote_code,
                                                    quantization_config=quantization_config)

    try:
        model = load(attn_implementation)
    except ValueError as err:
        if attn_implementation != "sdpa" or not any(k in str(err) for k in ("sdpa", "scaled_dot_product_attention")):
            raise
        log.warning("%s has no SDPA attention; using eager (%s)", path, str(err).splitlines()[0])
        return load("eager")
    use_varlen_sdpa(model)
    return model


def _tokenizer_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the sample dialogues plus every printable ASCII char."""
    texts = [m["content"] for d in sample_dialogues(512, seed=0) for m in d["messages"]]
    texts.append("".join(chr(c) for c in range(32, 127)))
    return texts


def build_tiny(out_dir: str | Path, seed: int = 0, arch: str = "mistral") -> str:
    """Write a tiny random-init model of family ``arch`` (``TINY_FAMILIES``: that family's real config
    class) + tokenizer to ``out_dir``; same seed and arch, same bytes. Every family shares the locally
    trained byte-level BPE tokenizer, which carries Zephyr's chat template."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if arch not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(TINY_FAMILY_NAMES)}")
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
        model_max_length=TINY_MAX_POSITIONS,
        chat_template=ZEPHYR_CHAT_TEMPLATE,
    )
    tok.save_pretrained(out)

    config_class, arch_kwargs = TINY_FAMILIES[arch]
    config = getattr(transformers, config_class)(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **arch_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def tiny_dir_name(arch: str = "mistral") -> str:
    """The folder the tiny model of ``arch`` is built in (``tiny-base`` for Mistral, as before)."""
    return "tiny-base" if arch == "mistral" else f"tiny-base-{arch}"


def tiny_label(seed: int, arch: str = "mistral") -> str:
    """How reports name a tiny model: ``tiny-seed1``, ``tiny-falcon-seed1``."""
    return f"tiny-seed{seed}" if arch == "mistral" else f"tiny-{arch}-seed{seed}"


def resolve_model_path(path: str | None, output_dir: str | Path, seed: int = 0, arch: str = "mistral") -> str:
    """``path`` when given (a GGUF file or embedded model name: its imported HF folder,
    ``gguf_import.resolve``); otherwise the tiny model of family ``arch``, built once under ``output_dir``."""
    if path:
        return resolve_gguf(path)
    tiny = Path(output_dir) / tiny_dir_name(arch)
    if not (tiny / "config.json").exists():
        log.info("model.path is empty: building the tiny random %s model in %s", arch, tiny)
        build_tiny(tiny, seed=seed, arch=arch)
    return str(tiny.absolute())  # Ray workers may run in another directory
