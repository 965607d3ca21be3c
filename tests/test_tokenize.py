"""Assistant-only labels, checked token by token against spans found independently of HF's tracker."""

import pytest

from zephyr_ray.data.tokenize import IGNORE_INDEX, tokenize_messages

DIALOGUES = [
    [
        {"role": "system", "content": "You are terse. Réponds en français si possible."},
        {"role": "user", "content": "Write a function that adds two numbers."},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"},
        {"role": "user", "content": "Now in one line, with 東京 and an emoji 🙂?"},
        {"role": "assistant", "content": "add = lambda a, b: a + b  # 東京 🙂"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " leading space, trailing newline\n"},
    ],
    [
        {"role": "user", "content": "Count: 1 2 3"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Again</s> <|user|> not special?"},
        {"role": "assistant", "content": "Данные λόγος — ok."},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ],
]


def _expected_labels(tokenizer, messages):
    """Assistant spans located by rendering growing prefixes of the dialogue (not by HF's tracker)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            spans.append((start, start + len(m["content"] + tokenizer.eos_token)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= a and b <= e for s, e in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return enc["input_ids"], labels, spans, text


def _labelled_runs(out):
    """The maximal runs of labelled tokens."""
    runs, run = [], []
    for tok, lab in zip(out["input_ids"], out["labels"]):
        if lab != IGNORE_INDEX:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    return runs + [run] if run else runs


@pytest.mark.parametrize("messages", DIALOGUES, ids=["system-code-unicode", "spaces", "three-turns"])
def test_labels_token_by_token(tokenizer, messages):
    out = tokenize_messages(tokenizer, messages)
    ids, labels, spans, text = _expected_labels(tokenizer, messages)
    assert out["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    # Each maximal labelled run decodes to exactly one assistant turn's content + EOS.
    runs = _labelled_runs(out)
    assistant = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(r) for r in runs] == assistant
    assert [text[s:e] for s, e in spans] == assistant


def test_format_is_zephyrs(tokenizer):
    text = tokenizer.apply_chat_template(DIALOGUES[1], tokenize=False, add_generation_prompt=False)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n leading space, trailing newline\n</s>\n"
    prompt = tokenizer.apply_chat_template(DIALOGUES[1][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    full = tokenize_messages(tokenizer, DIALOGUES[0])
    for n in (1, 7, len(full["input_ids"]) // 2, len(full["input_ids"]) + 5):
        cut = tokenize_messages(tokenizer, DIALOGUES[0], max_length=n)
        assert cut["input_ids"] == full["input_ids"][:n]
        assert cut["labels"] == full["labels"][:n]


# Released templates without {% generation %} markers (Qwen2's ChatML, Gemma's), written out here.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(("template", "end"), [(CHATML, "<|im_end|>"), (GEMMA, "<end_of_turn>")], ids=["chatml", "gemma"])
def test_template_without_generation_markers_labels_content_and_end_of_turn(tokenizer, template, end):
    tok = _with_template(tokenizer, template)
    messages = DIALOGUES[2]
    out = tokenize_messages(tok, messages)
    assert out["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # Each labelled run is one assistant turn: its content, then the end-of-turn marker, nothing of the
    # prompt or the newline the template writes after it.
    want = [m["content"].strip() + end for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in _labelled_runs(out)] == want
    text = tok.apply_chat_template(messages, tokenize=False)
    assert sum(lab != IGNORE_INDEX for lab in out["labels"]) < len(out["input_ids"]) and text.endswith(end + "\n")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Drops earlier assistant turns (as reasoning templates drop past thoughts): prefixes stop matching.
    tok = _with_template(tokenizer, "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                                    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="assistant turn 1 differently"):
        tokenize_messages(tok, DIALOGUES[2])
