from pathlib import Path

import pytest

from zephyr_ray.config import RECIPES, ConfigError, SFTRecipe, TrainConfig, load_config
from zephyr_ray.train.engine import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
# configs/serve/ holds Ray Serve config files (serve run / serve deploy), not recipes: tests/test_serve.py checks them.
RECIPE_FILES = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "serve")
DS_FILES = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPE_FILES} >= {"sft", "dpo", "generate", "aif", "selfinstruct"}
    assert {p.name for p in DS_FILES} >= {"zero0.json", "zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_loads(path):
    cfg = load_config(path, [], RECIPES[path.stem.split("_")[0]])  # sft_distill.yaml is an sft recipe
    if hasattr(cfg, "deepspeed"):
        ds = deepspeed_config(cfg.deepspeed, cfg.train, cfg.scaling.num_workers)
        assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * cfg.scaling.num_workers
    # Prompt templates a recipe names ship with the project.
    for judge in getattr(cfg, "judges", []):
        assert (ROOT / judge.templates).is_dir()
    if hasattr(cfg, "next_user_template"):
        assert (ROOT / cfg.next_user_template).is_file()


def test_list_sections_validate_items_and_take_indexed_overrides(tmp_path):
    from zephyr_ray.config import AIFRecipe

    cfg = load_config(ROOT / "configs/tiny/aif.yaml", ["candidates.1.tiny_seed=9", "sampling.stop=[x,y]"], AIFRecipe)
    assert [c.tiny_seed for c in cfg.candidates] == [1, 9, 3] and cfg.sampling.stop == ["x", "y"]
    with pytest.raises(ConfigError, match=r"unknown key 'candidates\[0\].bogus'.*max_concurrency"):
        load_config(ROOT / "configs/tiny/aif.yaml", ["candidates.0.bogus=1"], AIFRecipe)
    bad = tmp_path / "aif.yaml"
    bad.write_text("judges:\n  - mode: expected\n    engine: {backend: tensorflow}\n")
    with pytest.raises(ConfigError, match=r"judges\[0\].engine.backend='tensorflow'"):
        load_config(bad, [], AIFRecipe)


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_every_deepspeed_json_fills(path):
    cfg = deepspeed_config(SFTRecipe().deepspeed.__class__(config=str(path)), TrainConfig(micro_batch_size=3), 4)
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["train_batch_size"] == 12
    assert cfg["bf16"]["enabled"] is True
    assert "auto" not in str(cfg)


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/tiny/sft.yaml", ["train.lr=1e-4", "data.packing=false", "model.path=/m"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.packing is False
    assert cfg.model.path == "/m"
    assert isinstance(cfg, SFTRecipe)


def test_an_instance_gives_the_defaults_overrides_apply_over_it_and_it_is_validated():
    import dataclasses

    preset = load_config(ROOT / "configs/tiny/sft.yaml", ["train.lr=1e-4"])
    cfg = load_config(None, ["train.epochs=7"], preset)
    assert (cfg.train.lr, cfg.train.epochs, cfg.run.name) == (1e-4, 7, preset.run.name) and preset.train.epochs != 7

    @dataclasses.dataclass(frozen=True)
    class Sizes:
        pairs: int = 8
        beta: float = 0.1

    assert load_config(None, ["beta=0.5"], Sizes(pairs=16)) == Sizes(pairs=16, beta=0.5)
    with pytest.raises(ConfigError, match="unknown key 'pair'; valid keys under <root>: beta, pairs"):
        load_config(None, ["pair=4"], Sizes())
    with pytest.raises(ConfigError, match=r"data.on_bad_row='maybe'.*\['error', 'skip'\]"):
        load_config(None, ["data.on_bad_row=maybe"], preset)  # validated like a recipe from a file


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny/sft.yaml", ["train.lrr=1"])
    assert "train.lrr" in str(err.value) and "lr_scheduler" in str(err.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  pathh: x.jsonl\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "data.pathh" in str(err.value) and "max_length" in str(err.value)


def test_wrong_type_and_choice_fail_early():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"data.on_bad_row='maybe'.*\['error', 'skip'\]"):
        load_config(None, ["data.on_bad_row=maybe"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.lr"])


def test_deepspeed_conflict_is_an_error(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}')
    from zephyr_ray.config import DeepSpeedConfig

    with pytest.raises(ValueError, match="conflicts"):
        deepspeed_config(DeepSpeedConfig(config=str(p)), TrainConfig(micro_batch_size=8), 1)
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        deepspeed_config(DeepSpeedConfig(config=str(ROOT / "configs/deepspeed/zero2.json"), offload_params=True), TrainConfig(), 1)


def test_offload_options_reach_the_zero_block():
    from zephyr_ray.config import DeepSpeedConfig

    ds = deepspeed_config(DeepSpeedConfig(config="configs/deepspeed/zero3.json", offload_optimizer=True, offload_params=True),
                          TrainConfig(precision="fp32", max_grad_norm=0.5), 2)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match="stage 1, 2 or 3"):
        deepspeed_config(DeepSpeedConfig(config="configs/deepspeed/zero0.json", offload_optimizer=True), TrainConfig(), 1)


# --- rules between fields: each section's problems(), raised as ConfigError when the config loads ----------------

@pytest.mark.parametrize(("recipe", "overrides", "message"), [
    ("tiny/dpo.yaml", ["data.max_length=512", "dpo.max_prompt_length=512"],
     r"^dpo.max_prompt_length=512: leaves no room for a response in data.max_length=512"),
    ("tiny/aif.yaml", ["candidates.1.name=tiny-a"],
     r"^candidates: names must be distinct \(they label completions\): \['tiny-a', 'tiny-a', 'tiny-c'\]"),
    ("tiny/aif.yaml", ["judges=[]"], r"^judges=\[\]: needs at least one judge"),
    ("tiny/aif.yaml", ["judges.0.engine.backend=openai", "judges.0.engine.path=gpt-4", "judges.0.mode=expected"],
     r"^judges\[0\].mode='expected': expected needs next-token probabilities"),
    ("tiny/aif.yaml", ["judges.0.engine.backend=openai", "judges.0.mode=generate"],
     r"^judges\[0\].engine.path=None: must name the model for the openai backend"),
    ("tiny/aif.yaml", ["candidates.2.max_concurrency=0"], r"^candidates\[2\].max_concurrency=0: must be >= 1"),
    ("tiny/aif.yaml", ["sampling.max_new_tokens=0"], r"^sampling.max_new_tokens=0: must be >= 1"),
    ("tiny/aif.yaml", ["sampling.temperature=-1"], r"^sampling.temperature=-1.0: must be >= 0 \(0 = greedy\)"),
    ("tiny/aif.yaml", ["sampling.stop=['']"], r"^sampling.stop=\[''\]: must be non-empty strings"),
    ("tiny/selfinstruct.yaml", ["turns=0"], r"^turns=0: must be >= 1"),
    ("tiny/generate.yaml", ["sampling.n=0"], r"^sampling.n=0: must be >= 1"),
])
def test_cross_field_rules_fail_at_load_naming_the_fields(recipe, overrides, message):
    schema = RECIPES[Path(recipe).stem]
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / recipe, overrides, schema)


def test_aif_rules_that_depend_on_other_fields(tmp_path):
    from zephyr_ray.config import AIFRecipe

    # Pre-generated completions replace the candidates: their names no longer label anything.
    cfg = load_config(ROOT / "configs/tiny/aif.yaml", ["candidates.1.name=tiny-a", "completions=c.jsonl"], AIFRecipe)
    assert [c.name for c in cfg.candidates] == ["tiny-a", "tiny-a", "tiny-c"]
    # The openai backend needs a model name; a local one builds the tiny model without one.
    assert load_config(ROOT / "configs/tiny/aif.yaml", [], AIFRecipe).judges[0].engine.path is None
    two = tmp_path / "aif.yaml"
    two.write_text("judges:\n  - engine: {name: j}\n  - engine: {name: j, tiny_seed: 5}\n")
    with pytest.raises(ConfigError, match=r"^judges: engine names must be distinct \(they label scores\): \['j', 'j'\]"):
        load_config(two, [], AIFRecipe)


def test_a_choice_is_checked_before_the_rules_that_read_it(tmp_path):
    from zephyr_ray.config import EvalRecipe

    with pytest.raises(ConfigError, match=r"^judge.engine.backend='http' is not valid"):
        load_config(ROOT / "configs/tiny/eval.yaml", ["judge.engine.backend=http"], EvalRecipe)


def test_sampling_rules_are_one_set_for_configs_and_engines():
    from zephyr_ray.config import SamplingParams as FromConfig
    from zephyr_ray.generation import check_params
    from zephyr_ray.generation.types import SamplingParams

    assert SamplingParams is FromConfig
    assert SamplingParams(top_p=0, n=0).problems() == [("n", "must be >= 1"), ("top_p", "must be in (0, 1]")]
    with pytest.raises(ValueError, match=r"^sampling.n must be >= 1, got 0$"):
        check_params(SamplingParams(n=0))
    check_params(SamplingParams(temperature=0.7, top_p=0.95, stop=["\n\n"]))


def test_validate_checks_a_config_built_in_code():
    from zephyr_ray.config import DPOConfig, DPORecipe, validate

    validate(DPORecipe())
    with pytest.raises(ConfigError, match=r"^dpo.max_prompt_length=2048: leaves no room"):
        validate(DPORecipe(dpo=DPOConfig(max_prompt_length=2048)))
