"""Publishing to the Hugging Face Hub: a training stage's exported model with a generated model card, and at the end
of the pipeline the dDPO model (card with the evaluation table) and the AIF pairs as a dataset repo.

Clusters are torn down after a run, so the Hub is where a result outlives it (alignment-handbook pushes every
model, distilabel the feedback dataset). The client reads ``HF_TOKEN`` (or the saved login) and ``HF_ENDPOINT``
itself; nothing here passes a token. A push that fails (network, 401, 5xx) never loses the local result: it is
logged with the repo id and recorded as ``{"status": "failed", "error": ...}`` (``push.json`` beside a stage's
model, ``push`` in the pipeline's manifest and summary), and the CLI exits with :data:`PUSH_FAILED_EXIT`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from zephyr_ray.cluster import output_path
from zephyr_ray.config import HUB_REPO_ID, DPORecipe, PushToHubConfig, TrainingRecipe, to_dict

log = logging.getLogger(__name__)

# A stage's push outcome, beside its model folder; the card pushed as README.md is kept beside it too.
PUSH_RECORD = "push.json"
CARD_FILE = "model_card.md"
# Exit code of `zephyr-ray sft|dpo|pipeline` when everything local finished but a push failed (2 = user error).
PUSH_FAILED_EXIT = 3
# Short model names the project resolves itself (gguf_import.EMBEDDED_MODELS) -> (Hub id, license).
KNOWN_BASE_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
STAGE_TITLES = {"sft": "dSFT (distilled supervised fine-tuning)", "dpo": "dDPO (distilled direct preference optimisation)"}
# Bookkeeping columns of metrics.jsonl that are not results.
_NOT_METRICS = {"step", "epoch", "samples", "tokens", "step_time_s", "eval_runtime", "lr"}


# ---------------------------------------------------------------------------------------------------
# Model cards: pure functions of configs, data reports, metrics and summaries (plain dicts)
# ---------------------------------------------------------------------------------------------------

def hub_id(path: str | None) -> str | None:
    """The Hub id behind a model or data path (front matter may only name Hub repos): a known short name mapped,
    an ``owner/name`` that is not a local path kept, anything else (local folders, files, URLs) None."""
    if not path:
        return None
    if path in KNOWN_BASE_MODELS:
        return KNOWN_BASE_MODELS[path][0]
    if HUB_REPO_ID.fullmatch(path) and not Path(path).exists():
        return path
    return None


def _license(path: str | None) -> str | None:
    return KNOWN_BASE_MODELS[path][1] if path in KNOWN_BASE_MODELS else None


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "n/a" if x is None else str(x).lower()
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.4g}"  # 10096.1 tokens/s, not 1.01e+04
    return str(x)


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table (cells through ``_fmt``; ``|`` escaped)."""
    def cells(r: Iterable[Any]) -> str:
        return "| " + " | ".join(_fmt(c).replace("|", "\\|") for c in r) + " |"

    return [cells(header), "|" + "|".join("---" for _ in header) + "|", *(cells(r) for r in rows)]


def front_matter(meta: Mapping[str, Any]) -> str:
    """The card's YAML metadata block; keys with empty values are left out."""
    kept = {k: v for k, v in meta.items() if v not in (None, [], {})}
    return "---\n" + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True) + "---\n"


def _model_label(model: Mapping[str, Any]) -> str:
    path = model.get("path")
    if not path:
        return f"tiny random {model.get('tiny_arch')} model (seed {model.get('tiny_seed')})"
    rev = f" @ {model['revision']}" if model.get("revision") else ""
    return f"`{hub_id(path) or path}`{rev}"


def recipe_rows(recipe: Mapping[str, Any], stage: str, steps: int | None = None,
                initial: str | None = None) -> list[list[Any]]:
    """The key hyper-parameters of a training recipe (``config.to_dict`` of an SFT/DPO recipe); ``initial``
    describes the starting model instead of its path (the pipeline's dDPO starts from its dSFT model)."""
    t, d, m, sc = recipe["train"], recipe["data"], recipe["model"], recipe["scaling"]
    lora = m.get("lora") or {}
    rows: list[list[Any]] = [["stage", STAGE_TITLES[stage]], ["initial model", initial or _model_label(m)]]
    if lora.get("enabled"):
        quant = f", base quantized {lora['quantize']}" if lora.get("quantize", "none") != "none" else ""
        rows.append(["fine-tuning", f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                                    f"modules {', '.join(lora['target_modules'])}{quant} (merged into the weights)"])
    else:
        rows.append(["fine-tuning", "full"])
    rows.append(["epochs", t["epochs"] if not t.get("max_steps") else f"{t['epochs']} (max_steps {t['max_steps']})"])
    if steps is not None:
        rows.append(["optimizer steps", steps])
    global_batch = t["micro_batch_size"] * t["gradient_accumulation_steps"] * sc["num_workers"]
    rows += [
        ["learning rate", f"{_fmt(t['lr'])} ({t['lr_scheduler']}, warmup ratio {_fmt(t['warmup_ratio'])})"],
        ["batch per step", f"{t['micro_batch_size']} x {t['gradient_accumulation_steps']} accumulation x "
                           f"{sc['num_workers']} workers = {global_batch} {'pairs' if stage == 'dpo' else 'rows'}"],
        ["optimizer", f"AdamW (betas {_fmt(t['adam_beta1'])}, {_fmt(t['adam_beta2'])}; weight decay "
                      f"{_fmt(t['weight_decay'])}; gradient clipping {_fmt(t['max_grad_norm'])})"],
        ["precision", t["precision"]],
        ["max length", f"{d['max_length']} tokens, packing {_fmt(bool(d['packing']))}"],
        ["seed", t["seed"]],
    ]
    if stage == "dpo":
        p = recipe["dpo"]
        ref = p["ref"].get("path") or "the initial model (frozen)"
        rows += [["DPO loss", f"{p['loss_type']}, beta {_fmt(p['beta'])}, label smoothing {_fmt(p['label_smoothing'])}"
                              + (f", RPO alpha {_fmt(p['rpo_alpha'])}" if p.get("rpo_alpha") else "")
                              + (", length-normalised (reward per answer token)" if p.get("length_normalize") else "")],
                 ["reference model", f"{ref} (log-probs: {p['ref']['mode']})"],
                 ["max prompt length", p["max_prompt_length"]]]
    distill = recipe.get("distill") or {}
    if distill.get("enabled"):
        teacher = distill.get("teacher") or f"tiny random model (seed {distill.get('teacher_tiny_seed')})"
        rows.append(["distillation", f"teacher {teacher}, {distill['loss']}, temperature {_fmt(distill['temperature'])}, "
                                     f"alpha {_fmt(distill['alpha'])}, top-{distill['top_k']} log-probs"])
    return rows


def data_rows(data: Mapping[str, Any], report: Mapping[str, Any] | None) -> list[list[Any]]:
    """Rows of the data table: the training source and any held-out set, with the counts the stage planned
    (``data_report.json``)."""
    def counts(r: Mapping[str, Any]) -> list[Any]:
        return [r.get("rows"), r.get("used"), sum((r.get("skipped") or {}).values()), r.get("truncated"),
                r.get("tokens")]

    source = f"{hub_id(data['path']) or data['path']} (split {data.get('split', 'train')})"
    if report is None:
        return [[source, "training", "n/a", "n/a", "n/a", "n/a", "n/a"]]
    rows = [[source, "training", *counts(report)]]
    if report.get("eval"):
        rows.append([report["eval"].get("source", "held out"), "held out", *counts(report["eval"])])
    return rows


DATA_HEADER = ["source", "role", "rows read", "rows used", "skipped", "truncated", "tokens"]


def final_metrics(metrics: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The last logged value of every metric (held-out ones are evaluated every few steps only)."""
    last: dict[str, Any] = {}
    for row in metrics:
        for key, value in row.items():
            if key not in _NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool):
                last[key] = value
    return last


def stage_card(stage: str, recipe: Mapping[str, Any], data_report: Mapping[str, Any] | None,
               metrics: list[Mapping[str, Any]], repo_id: str, curves: bool) -> str:
    """README.md of a stage's model: front matter (base model, tags, datasets, license), the recipe, the data
    with the rows used, the training curves (``curves.png`` uploaded beside it) and the final metrics."""
    m, d = recipe["model"], recipe["data"]
    tags = ["zephyr-ray", stage]
    if (m.get("lora") or {}).get("enabled"):
        tags.append("lora")
    if (recipe.get("distill") or {}).get("enabled"):
        tags.append("distillation")
    meta = {"base_model": hub_id(m.get("path")), "library_name": "transformers", "license": _license(m.get("path")),
            "tags": tags, "datasets": [x for x in [hub_id(d["path"])] if x], "pipeline_tag": "text-generation"}
    steps = metrics[-1].get("step") if metrics else None
    lines = [front_matter(meta), f"# {repo_id.split('/', 1)[1]}", "",
             f"{STAGE_TITLES[stage]} of {_model_label(m)} with zephyr-ray, the Zephyr recipe "
             "(Tunstall et al., 2023) on Ray Train + DeepSpeed.", "", "## Recipe", "",
             *_table(["setting", "value"], recipe_rows(recipe, stage, steps)), "", "## Data", "",
             *_table(DATA_HEADER, data_rows(d, data_report)), ""]
    if curves:
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    final = final_metrics(metrics)
    lines += [f"## Final metrics (step {_fmt(steps)})", ""]
    lines += _table(["metric", "value"], sorted(final.items())) if final else ["No metrics were logged."]
    return "\n".join(lines) + "\n"


def eval_lines(e: Mapping[str, Any]) -> list[str]:
    """The evaluation table of a pipeline summary (``pipeline.summarize``'s ``eval``): MT-Bench overall and per
    category for each model, then win rates against the reference."""
    models = list(e.get("mt_bench") or {}) or list(e.get("win_rate") or {})
    how = "probability-weighted ratings" if e.get("judge_mode") == "expected" else "parsed ratings"
    lines = [f"Judge: `{e.get('judge')}` ({how}).", ""]
    if e.get("mt_bench"):
        rows = [[c, *(e["mt_bench"][n].get(c) for n in models)] for c in ["overall", *e.get("categories", [])]]
        lines += ["### MT-Bench", "", *_table(["MT-Bench", *models], rows), ""]
    if e.get("win_rate"):
        rows = [[n, f"{s['win_rate']:.1%}", f"{s['standard_error']:.1%}" if s.get("standard_error") is not None
                 else "n/a"] for n, s in e["win_rate"].items()]
        lines += [f"### Win rate against `{e.get('reference')}`", "",
                  *_table(["model", "win rate", "standard error"], rows), ""]
    return lines


def pipeline_card(config: Mapping[str, Any], summary: Mapping[str, Any], reports: Mapping[str, Any],
                  repo_id: str, dataset_repo_id: str | None, images: Iterable[str] = ()) -> str:
    """README.md of the pipeline's final (dDPO) model: both training stages' recipes and data, the AIF pairs
    (``dataset_repo_id``), final metrics and the evaluation table of the pipeline summary; ``images`` names the
    pictures uploaded beside it (``curves.png``, ``mt_bench_radar.png``)."""
    sft, dpo = config["sft"], config["dpo"]
    base = sft["model"].get("path")
    tags = ["zephyr-ray", "sft", "dpo"]
    if (sft["model"].get("lora") or {}).get("enabled") or (dpo["model"].get("lora") or {}).get("enabled"):
        tags.append("lora")
    datasets = [x for x in [hub_id(sft["data"]["path"]), dataset_repo_id] if x]
    meta = {"base_model": hub_id(base), "library_name": "transformers", "license": _license(base), "tags": tags,
            "datasets": datasets, "pipeline_tag": "text-generation"}
    s, images = dict(summary), set(images)
    lines = [front_matter(meta), f"# {repo_id.split('/', 1)[1]}", "",
             f"{_model_label(sft['model'])} aligned with the Zephyr recipe (Tunstall et al., 2023) by "
             f"zephyr-ray: dSFT -> AI feedback -> dDPO -> MT-Bench / AlpacaEval-style evaluation "
             f"(run `{s.get('run_id')}`).", ""]
    sft_steps = (s.get("sft") or {}).get("steps")
    dpo_steps = (s.get("dpo") or {}).get("step")
    lines += ["## Recipe", "", "### dSFT", "", *_table(["setting", "value"], recipe_rows(sft, "sft", sft_steps)), "",
              "### dDPO", "",
              *_table(["setting", "value"], recipe_rows(dpo, "dpo", dpo_steps, initial="the dSFT model above")), ""]
    aif = s.get("aif") or {}
    pairs_source = f"AI-feedback pairs ({dataset_repo_id})" if dataset_repo_id else "AI-feedback pairs"
    dpo_rows = data_rows({**dpo["data"], "path": pairs_source}, reports.get("dpo"))
    lines += ["## Data", "", *_table(DATA_HEADER, [*data_rows(sft["data"], reports.get("sft")), *dpo_rows]), ""]
    if aif:
        judges = ", ".join(j["engine"]["name"] for j in config["aif"].get("judges", []))
        lines += [f"AI feedback: {aif.get('pairs')} preference pairs ({aif.get('skipped')} prompts skipped) from "
                  f"`{config['aif']['prompts']['path']}`, rated by {judges or 'n/a'}.", ""]
    if "curves.png" in images:
        lines += ["## Training curves (dDPO)", "", "![training curves](curves.png)", ""]
    final = [["dSFT", k, v] for k, v in (s.get("sft") or {}).items() if k != "steps"]
    final += [["dDPO", k, v] for k, v in (s.get("dpo") or {}).items() if k != "step"]
    lines += ["## Final metrics", "", *(_table(["stage", "metric", "value"], final) if final else ["n/a"]), ""]
    if s.get("eval"):
        lines += ["## Evaluation", "", *eval_lines(s["eval"])]
        if "mt_bench_radar.png" in images:
            lines += ["![MT-Bench per category](mt_bench_radar.png)", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def dataset_card(repo_id: str, model_repo_id: str | None, report: Mapping[str, Any] | None, pairs: int | None,
                 config: Mapping[str, Any] | None = None) -> str:
    """README.md of the AIF pairs' dataset repo: what made the pairs and how many there are."""
    meta = {"tags": ["zephyr-ray", "dpo", "preference", "ai-feedback"], "task_categories": ["text-generation"],
            "configs": [{"config_name": "default", "data_files": [{"split": "train_prefs", "path": "pairs.jsonl"}]}]}
    lines = [front_matter(meta), f"# {repo_id.split('/', 1)[1]}", "",
             "Preference pairs made by the AI-feedback stage of zephyr-ray: candidate models answer "
             "each prompt, judges rate every answer, the best-rated answer is `chosen` and a random lower-rated one "
             "`rejected` (UltraFeedback binarisation, as for Zephyr)."
             + (f" The dDPO model trained on them: `{model_repo_id}`." if model_repo_id else ""),
             "", f"Pairs: {_fmt(pairs)} (`pairs.jsonl`; columns prompt, prompt_id, chosen, rejected, messages, "
                 "score_chosen, score_rejected, chosen_model, rejected_model, judge).", ""]
    if config:
        lines += [f"Prompts: `{config['prompts']['path']}`.", ""]
    per_model = (report or {}).get("completions_per_model") or {}
    if per_model:
        rows = [[n, v.get("completions"), v.get("scored"), v.get("mean_score")] for n, v in per_model.items()]
        lines += ["## Candidates", "", *_table(["model", "completions", "scored", "mean score"], rows), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------

def _api() -> Any:
    """The Hub client; ``HF_ENDPOINT`` read now (the client reads it once, at import), the token by the client."""
    # huggingface_hub is imported here: only a push needs it, and importing it fixes HF_ENDPOINT for the process.
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _commit(repo_id: str, repo_type: str, files: Mapping[str, Path | bytes], cfg: PushToHubConfig,
            message: str) -> dict[str, Any]:
    """Create the repo (``cfg.private``; kept as it is when it exists) and the branch ``cfg.revision`` when missing,
    then commit ``files`` (path in repo -> local file or bytes) in one commit."""
    from huggingface_hub import CommitOperationAdd

    api = _api()
    url = api.create_repo(repo_id, repo_type=repo_type, private=cfg.private, exist_ok=True)
    if cfg.revision != "main":
        api.create_branch(repo_id, repo_type=repo_type, branch=cfg.revision, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src if isinstance(src, bytes) else str(src))
           for name, src in files.items()]
    info = api.create_commit(repo_id, ops, repo_type=repo_type, revision=cfg.revision,
                             commit_message=cfg.commit_message or message)
    log.info("pushed %d files to %s %s (revision %s): %s", len(files), repo_type, repo_id, cfg.revision,
             info.commit_url)
    return {"status": "done", "repo_id": repo_id, "repo_type": repo_type, "revision": cfg.revision,
            "url": str(url), "commit": info.oid, "files": sorted(files)}


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its POSIX path relative to it (hidden files and folders left out)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def push_model(folder: str | Path, push_cfg: PushToHubConfig, card: str, extra: Mapping[str, Path] | None = None,
               message: str | None = None) -> dict[str, Any]:
    """Push an exported model folder with ``card`` as its README.md and ``extra`` files (path in repo -> local
    file, e.g. ``curves.png``) to ``push_cfg.repo_id`` in one commit. Raises on failure (:func:`safe_push`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an exported model folder (no config.json)")
    files: dict[str, Path | bytes] = {**folder_files(folder), **(extra or {}), "README.md": card.encode()}
    return _commit(_required(push_cfg.repo_id), "model", files, push_cfg,
                   message or f"zephyr-ray: model from {folder}")


def dataset_repo(push_cfg: PushToHubConfig) -> str:
    """The dataset repo of ``push_cfg``: ``dataset_repo_id``, else ``<repo_id>-aif-pairs``."""
    return push_cfg.dataset_repo_id or f"{_required(push_cfg.repo_id)}-aif-pairs"


def push_dataset(files: Mapping[str, Path] | Iterable[Path], push_cfg: PushToHubConfig, card: str,
                 message: str | None = None) -> dict[str, Any]:
    """Push data ``files`` (a list: by their names; a mapping: path in repo -> local file) with ``card`` as the
    README.md to :func:`dataset_repo` in one commit. Raises on failure (:func:`safe_push`)."""
    named = dict(files) if isinstance(files, Mapping) else {Path(f).name: Path(f) for f in files}
    for name, path in named.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file to push as {name}")
    return _commit(dataset_repo(push_cfg), "dataset", {**named, "README.md": card.encode()}, push_cfg,
                   message or "zephyr-ray: AI-feedback preference pairs")


def _required(repo_id: str | None) -> str:
    if not repo_id:
        raise ValueError("push_to_hub.repo_id is required to push")
    return repo_id


def _error(exc: BaseException) -> str:
    """One line: the exception's type and first line (HTTP errors carry their status and the server's message)."""
    text = str(exc).strip().splitlines()
    server = (getattr(exc, "server_message", None) or "").strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text[0][:500] if text else ''}" + (f" ({server[:300]})" if server else "")


def failed(repo_id: str | None, exc: BaseException, revision: str | None = None) -> dict[str, Any]:
    return {"status": "failed", "repo_id": repo_id, "revision": revision, "error": _error(exc)}


def push_stage(cfg: TrainingRecipe, out: str | Path) -> dict[str, Any] | None:
    """After a training stage exported ``out/model``: when ``cfg.run.push_to_hub.enabled``, write its card to
    ``out/model_card.md``, push model, card and ``curves.png`` and record the outcome in ``out/push.json``.
    Never raises (the stage's result is already on disk): a failure is logged and recorded. None when disabled."""
    push = cfg.run.push_to_hub
    if not push.enabled:
        return None
    out = Path(out)
    stage = "dpo" if isinstance(cfg, DPORecipe) else "sft"
    try:
        metrics = _read_jsonl(out / "metrics.jsonl")
        report = _read_json(out / "data_report.json")
        curves = out / "curves.png"
        card = stage_card(stage, to_dict(cfg), report, metrics, _required(push.repo_id), curves.is_file())
        (out / CARD_FILE).write_text(card)
        record = push_model(out / "model", push, card, {"curves.png": curves} if curves.is_file() else None,
                            message=f"zephyr-ray: {stage} model from {out.name}")
    except Exception as exc:
        log.error("pushing the %s model of %s to %s failed (the local result is kept): %s", stage, out,
                  push.repo_id, _error(exc))
        record = failed(push.repo_id, exc, push.revision)
    (out / PUSH_RECORD).write_text(json.dumps(record, indent=2))
    return record


def publish_pipeline(push: PushToHubConfig, config: Mapping[str, Any], stages: Mapping[str, Any],
                     summary: Mapping[str, Any]) -> dict[str, Any]:
    """The end of the pipeline: the dDPO model (card with the evaluation table, dDPO curves, MT-Bench radar) and the
    AIF pairs (dataset repo). ``stages`` is the manifest's ``stages``; never raises. Returns
    ``{status, model, dataset[, error]}``: status ``failed`` (with the first error) when either push failed."""
    dpo_dir = Path(stages["dpo"]["artifacts"]["model"]).parent
    result: dict[str, Any] = {}
    try:
        data_set = dataset_repo(push)
        aif = stages.get("aif", {}).get("artifacts", {})
        pairs = Path(aif["pairs"]) if aif.get("pairs") else None
        images = {"curves.png": dpo_dir / "curves.png"}
        chart = stages.get("eval", {}).get("artifacts", {}).get("chart")
        if chart:
            images["mt_bench_radar.png"] = Path(chart)
        images = {k: v for k, v in images.items() if v.is_file()}
        reports = {s: _read_json(Path(stages[s]["artifacts"]["model"]).parent / "data_report.json")
                   for s in ("sft", "dpo") if stages.get(s, {}).get("artifacts")}
        card = pipeline_card(config, summary, reports, _required(push.repo_id),
                             data_set if pairs is not None else None, images)
        (dpo_dir / CARD_FILE).write_text(card)
        run = summary.get("run_id")
        try:
            result["model"] = push_model(dpo_dir / "model", push, card, images,
                                         message=f"zephyr-ray: dDPO model of pipeline run {run}")
        except Exception as exc:
            log.error("pushing the dDPO model to %s failed (the local result is kept): %s", push.repo_id, _error(exc))
            result["model"] = failed(push.repo_id, exc, push.revision)
        if pairs is not None:
            try:
                files = {"pairs.jsonl": pairs}
                if aif.get("report") and Path(aif["report"]).is_file():
                    files["aif_report.json"] = Path(aif["report"])
                d_card = dataset_card(data_set, push.repo_id, _read_json(Path(aif.get("report", ""))),
                                      aif.get("count"), config.get("aif"))
                result["dataset"] = push_dataset(files, push, d_card,
                                                 message=f"zephyr-ray: AIF pairs of pipeline run {run}")
            except Exception as exc:
                log.error("pushing the AIF pairs to %s failed (the local result is kept): %s", data_set, _error(exc))
                result["dataset"] = failed(data_set, exc, push.revision)
    except Exception as exc:
        log.error("publishing the pipeline run to %s failed (the local result is kept): %s", push.repo_id, _error(exc))
        result["model"] = failed(push.repo_id, exc, push.revision)
    errors = [r["error"] for r in result.values() if r.get("status") == "failed"]
    return {"status": "failed" if errors else "done", **({"error": errors[0]} if errors else {}), **result}


# ---------------------------------------------------------------------------------------------------
# Outcomes for the CLI
# ---------------------------------------------------------------------------------------------------

def push_failures(records: Iterable[Mapping[str, Any] | None]) -> list[str]:
    """``"<repo id>: <error>"`` for every failed push record (stage records, or the pipeline's with its parts)."""
    out = []
    for r in records:
        if not r:
            continue
        parts = [r[k] for k in ("model", "dataset") if isinstance(r.get(k), Mapping)] or [r]
        out += [f"{p.get('repo_id')}: {p.get('error')}" for p in parts if p.get("status") == "failed"]
    return out


def stage_push_record(cfg: Any) -> dict[str, Any] | None:
    """The push record a training stage wrote (``push.json`` in its output folder), None when it did not push
    (other stages never do)."""
    if not isinstance(cfg, TrainingRecipe) or not cfg.run.push_to_hub.enabled:
        return None
    return _read_json(output_path(cfg.run.output_dir) / PUSH_RECORD)


def pipeline_push_records(manifest: Mapping[str, Any]) -> list[dict[str, Any] | None]:
    """The pipeline's own push and any training stage's (``run.push_to_hub`` under a stage section)."""
    stages = manifest.get("stages", {})
    return [manifest.get("push"), *((s.get("artifacts") or {}).get("push") for s in stages.values())]


def push_lines(record: Mapping[str, Any] | None) -> list[str]:
    """One line per pushed repo of a pipeline push record, for the printed summary."""
    lines = []
    for part in ("model", "dataset"):
        r = (record or {}).get(part)
        if not r:
            continue
        if r.get("status") == "done":
            lines.append(f"pushed the {part} to {r['repo_id']} (revision {r['revision']}): {r.get('url')}")
        else:
            lines.append(f"push of the {part} to {r.get('repo_id')} FAILED (kept locally): {r.get('error')}")
    return lines


def push_exit_code(records: Iterable[Mapping[str, Any] | None]) -> int:
    """:data:`PUSH_FAILED_EXIT` (and one stderr line per failure) when a push failed, else 0."""
    failures = push_failures(records)
    for line in failures:
        print(f"push to the Hub failed, the local result is kept: {line}", file=sys.stderr)
    return PUSH_FAILED_EXIT if failures else 0


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
