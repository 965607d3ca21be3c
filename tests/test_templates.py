"""Chat-template overrides: the named templates' exact renderings, their training labels, config checks, and a dSFT
export that carries the template."""

import json
import re

import pytest

from zephyr_ray.config import ConfigError, EngineConfig, PipelineRecipe, ServeRecipe, SFTRecipe, load_config
from zephyr_ray.data.tokenize import IGNORE_INDEX, tokenize_messages
from zephyr_ray.models import ZEPHYR_CHAT_TEMPLATE, chat_template_source, load_tokenizer
from zephyr_ray.templates import NAMED_TEMPLATES, read_chat_template

from .conftest import ROOT

TINY_PIPELINE = ROOT / "configs" / "tiny" / "pipeline.yaml"

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]

# The tiny tokenizer's bos <s> and eos </s>; written out from each format's public definition.
RENDERED = {
    "zephyr": "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n"
              "<|assistant|>\n4</s>\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>",
    # Mistral's has no system role: the system message is folded into the first user turn.
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s> [INST] 2+2? [/INST]4</s> ",
}
# The prompt for the second answer (through the second user turn, with the generation prompt).
PROMPT = {
    "zephyr": "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n"
              "<|assistant|>\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama-2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s> [INST] 2+2? [/INST]",
}


def test_every_named_template_is_shipped_and_zephyrs_is_the_models_default():
    assert set(NAMED_TEMPLATES) == set(RENDERED)
    assert read_chat_template("zephyr") == ZEPHYR_CHAT_TEMPLATE


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
def test_named_template_renders_a_two_turn_dialogue_exactly(tiny_model, name):
    tok = load_tokenizer(tiny_model, chat_template=name)
    assert tok.apply_chat_template([SYSTEM, *TWO_TURNS], tokenize=False) == RENDERED[name]
    assert tok.apply_chat_template([SYSTEM, *TWO_TURNS[:3]], tokenize=False, add_generation_prompt=True) == PROMPT[name]


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
def test_generation_markers_label_what_prefix_rendering_labels(tiny_model, name):
    # tokenize.py labels by the {% generation %} markers where a template has them, else by rendering prefixes;
    # the named templates' markers cover exactly what follows the generation prompt (no token the model must
    # generate is left untrained, e.g. llama-2's space after [/INST]).
    tok = load_tokenizer(tiny_model, chat_template=name)
    marked = tokenize_messages(tok, [SYSTEM, *TWO_TURNS])
    marker = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")
    assert marker.search(tok.chat_template)
    tok.chat_template = marker.sub("", tok.chat_template)
    assert tokenize_messages(tok, [SYSTEM, *TWO_TURNS]) == marked
    assert sum(label != IGNORE_INDEX for label in marked["labels"]) > 0


@pytest.fixture(scope="module")
def chatml_model(tiny_model, tmp_path_factory):
    """The tiny tokenizer with ChatML's two markers as single tokens, as a ChatML model's vocabulary has them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    path = tmp_path_factory.mktemp("chatml")
    tok.save_pretrained(path)
    return str(path)


def test_chatml_labels_token_by_token_and_ends_turns_with_im_end(chatml_model):
    tok = load_tokenizer(chatml_model, chat_template="chatml")
    assert tok.eos_token == "<|im_end|>"  # a dDPO response (content + EOS) and generation end turns as dSFT does
    out = tokenize_messages(tok, TWO_TURNS)
    got = [(t, label != IGNORE_INDEX) for t, label in zip(tok.convert_ids_to_tokens(out["input_ids"]), out["labels"])]
    prompt, answer = False, True
    assert got == [
        ("<|im_start|>", prompt), ("u", prompt), ("s", prompt), ("er", prompt), ("Ċ", prompt), ("H", prompt),
        ("i", prompt), ("<|im_end|>", prompt), ("Ċ", prompt),
        ("<|im_start|>", prompt), ("a", prompt), ("s", prompt), ("sist", prompt), ("ant", prompt), ("Ċ", prompt),
        ("H", answer), ("el", answer), ("l", answer), ("o", answer), ("!", answer), ("<|im_end|>", answer),
        ("Ċ", prompt),
        ("<|im_start|>", prompt), ("u", prompt), ("s", prompt), ("er", prompt), ("Ċ", prompt), ("2", prompt),
        ("+", prompt), ("2", prompt), ("?", prompt), ("<|im_end|>", prompt), ("Ċ", prompt),
        ("<|im_start|>", prompt), ("a", prompt), ("s", prompt), ("sist", prompt), ("ant", prompt), ("Ċ", prompt),
        ("4", answer), ("<|im_end|>", answer), ("Ċ", prompt),
    ]
    assert out["labels"] == [t if keep else IGNORE_INDEX for t, (_, keep) in zip(out["input_ids"], got)]


def test_a_jinja_file_is_a_template_too(tiny_model, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}\n")
    tok = load_tokenizer(tiny_model, chat_template=str(path))
    assert tok.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True) == "user: Hi\nassistant:"
    assert chat_template_source(tiny_model, chat_template=str(path)) == f"override: {path}"
    cfg = load_config(None, [f"model.chat_template={path}"], schema=SFTRecipe)
    assert cfg.model.chat_template == str(path)


def test_unknown_name_or_missing_file_is_a_config_error_naming_the_field(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"model.chat_template='vicuna': neither a named template \(zephyr, chatml, "
                                          r"llama-2, mistral\) nor an existing Jinja file"):
        load_config(None, ["model.chat_template=vicuna"], schema=SFTRecipe)
    with pytest.raises(ConfigError, match=r"engine.chat_template='.*missing.jinja': neither a named template"):
        load_config(None, [f"engine.chat_template={tmp_path / 'missing.jinja'}"], schema=ServeRecipe)
    with pytest.raises(ConfigError, match=r"aif.judges\[0\].engine.chat_template='x': neither"):
        load_config(TINY_PIPELINE, ["aif.judges.0.engine.chat_template=x"], schema=PipelineRecipe)
    with pytest.raises(ValueError, match="chat template 'vicuna': neither a named template"):
        load_tokenizer(tiny_model, chat_template="vicuna")


def test_pipeline_prompts_its_trained_models_with_their_own_template(tmp_path):
    from zephyr_ray.pipeline import aif_config

    cfg = load_config(TINY_PIPELINE, ["aif.candidates.0.chat_template=llama-2", "sft.model.chat_template=chatml"],
                      schema=PipelineRecipe)
    aif = aif_config(cfg, tmp_path, "sft-model")
    # The dSFT model carries chatml in its exported tokenizer; the other candidate keeps its own override.
    pairs = [(c.name, c.chat_template) for c in aif.candidates]
    assert pairs[0] == (cfg.aif.candidates[0].name, "llama-2") and pairs[-1] == ("dsft", None)
    with pytest.raises(ConfigError, match=r"eval.models\[0\].chat_template='zephyr': the pipeline's trained models"):
        load_config(TINY_PIPELINE, ["eval.models.0.chat_template=zephyr"], schema=PipelineRecipe)  # at load


def test_serve_llm_cannot_take_an_override():
    from zephyr_ray.serve.app import use_serve_llm

    recipe = ServeRecipe(engine=EngineConfig(backend="vllm", chat_template="chatml"))
    assert use_serve_llm(recipe) is False  # auto: our ingress, which renders with the override
    with pytest.raises(ConfigError, match="engine.chat_template='chatml': serve.vllm_app=serve_llm prompts with"):
        load_config(None, ["engine.backend=vllm", "engine.chat_template=chatml", "serve.vllm_app=serve_llm"],
                    schema=ServeRecipe)  # at load


@pytest.mark.ray
@pytest.mark.slow
def test_dsft_on_a_mixture_exports_the_override(ray_cluster, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from zephyr_ray.data.io import write_jsonl
    from zephyr_ray.data.samples import sample_dialogues
    from zephyr_ray.train.sft import run_sft

    dialogues = sample_dialogues(24, seed=5)
    a = write_jsonl(dialogues[:16], tmp_path / "a.jsonl")
    b = write_jsonl([{"conversations": d["messages"]} for d in dialogues[16:]], tmp_path / "b.jsonl")
    mixture = f"[{{path: {a}, weight: 0.5}}, {{path: {b}, weight: 2.0, columns: {{conversations: messages}}}}]"
    cfg = load_config(ROOT / "configs/tiny/sft.yaml",
                      [f"model.path={tiny_model}", f"run.output_dir={tmp_path / 'run'}", "wandb.enabled=false",
                       "data.path=null", f"data.mixture={mixture}", "model.chat_template=llama-2",
                       "train.max_steps=2", "train.epochs=1", "scaling.num_workers=1", "scaling.cpus_per_worker=1"],
                      schema=SFTRecipe)
    result = run_sft(cfg)
    assert result.chat_template == "override: llama-2"
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert [(s["path"], s["rows"], s["used"], s["held_out"]) for s in report["mixture"]] == [
        (str(a), 16, 8, 0), (str(b), 8, 16, 0)]
    assert report["rows"] == report["used"] == 24  # every mixed row validated with the template
    model = result.model_dir
    saved = json.loads((model / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == read_chat_template("llama-2")
    assert not (model / "chat_template.jinja").exists()
    # Loaded plainly (no override): the trained model prompts in the format it was trained in.
    plain = AutoTokenizer.from_pretrained(model)
    assert plain.apply_chat_template([SYSTEM, *TWO_TURNS], tokenize=False) == RENDERED["llama-2"]
