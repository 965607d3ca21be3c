"""Named chat templates (``model.chat_template`` / ``engine.chat_template``) and reading a template override.

The ``.jinja`` files here follow the formats' public definitions, with ``{% generation %}`` markers around what the
model generates after the prompt (content + end of turn; llama-2's also the space after ``[/INST]``) so training
labels exactly that (``data/tokenize.py``; the same tokens its prefix rendering finds); the markers render nothing
of their own:

- ``zephyr``: HuggingFaceH4/zephyr-7b-beta's (``<|user|>\\n...</s>\\n<|assistant|>\\n...</s>\\n``);
- ``chatml``: OpenAI's ChatML as in Hugging Face's chat-template docs (``<|im_start|>role\\n...<|im_end|>\\n``);
- ``llama-2``: meta-llama/Llama-2-*-chat-hf's (``<s>[INST] <<SYS>>...<</SYS>> ... [/INST] answer </s>``);
- ``mistral``: mistralai/Mistral-7B-Instruct-v0.1's (``<s>[INST] ... [/INST]answer</s> ``; no system role: a
  system message is folded into the first user turn where the tokenizer is loaded, ``models.load_tokenizer``).

Pure standard library: the config imports it to check a name or file when a recipe loads.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent
_PROJECT_ROOT = TEMPLATES_DIR.parents[1]
NAMED_TEMPLATES = ("zephyr", "chatml", "llama-2", "mistral")
# A named template's end-of-turn marker where it is not the tokenizer's EOS token: it becomes the EOS token where
# the vocabulary has it as one token (as ChatML models do), so a turn ends the same way in the dSFT labels, the dDPO
# responses (content + EOS) and generation (which stops at EOS).
END_OF_TURN = {"chatml": "<|im_end|>"}


def template_file(spec: str) -> Path | None:
    """The Jinja file ``spec`` names: a packaged named template, else a path (from the working directory, then the
    project root, as config paths are); None when there is no such file."""
    if spec in NAMED_TEMPLATES:
        return TEMPLATES_DIR / f"{spec}.jinja"
    path = Path(spec).expanduser()
    for candidate in (path, _PROJECT_ROOT / path):
        if candidate.is_file():
            return candidate.absolute()
    return None


def template_problem(spec: str) -> str | None:
    """What is wrong with a template override (checked when a recipe loads), or None."""
    if template_file(spec) is None:
        return (f"neither a named template ({', '.join(NAMED_TEMPLATES)}) nor an existing Jinja file (looked in the "
                "working directory and the project root)")
    return None


def read_chat_template(spec: str) -> str:
    """The Jinja text of a named template or template file. One trailing newline is dropped: Jinja drops it when
    rendering anyway, and the text is what a tokenizer saves."""
    path = template_file(spec)
    if path is None:
        raise ValueError(f"chat template {spec!r}: {template_problem(spec)}")
    return path.read_text(encoding="utf-8").removesuffix("\n")
