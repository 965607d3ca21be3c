"""Publishing to the Hub (zephyr_ray/publish.py): the REAL huggingface_hub client against a local fake Hub.

The fake answers the endpoints the client calls (repo creation, branch creation, README validation, preupload,
commit) and tells it to send every file inline ("regular" upload mode), so the test sees each file's bytes.
No Ray, no torch: the stage folders are made by hand, as a finished dSFT / pipeline run leaves them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from zephyr_ray.config import (
    ConfigError,
    DPORecipe,
    PipelineRecipe,
    PushToHubConfig,
    SFTRecipe,
    load_config,
    to_dict,
)
from zephyr_ray.publish import (
    CARD_FILE,
    PUSH_FAILED_EXIT,
    PUSH_RECORD,
    dataset_card,
    pipeline_card,
    pipeline_push_records,
    publish_pipeline,
    push_dataset,
    push_exit_code,
    push_model,
    push_stage,
    stage_card,
    stage_push_record,
)

TOKEN = "hf_test_token_123"


class FakeHub:
    """The Hub API endpoints of a push, in a thread; records every request. ``fail`` maps a path fragment (e.g.
    ``/commit/``) to the status answered there; a request without ``Bearer TOKEN`` gets 401."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail: dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append({"method": self.command, "path": self.path, "body": body,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}})
                code, payload = hub.answer(self.path, self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        api = ("/api/repos/create", "/api/validate-yaml", "/preupload/", "/commit/", "/branch/")
        if not any(part in path for part in api):
            return 404, {"error": "not found"}  # e.g. the client's own agent-registry lookup
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        for fragment, status in self.fail.items():
            if fragment in path:
                return status, {"error": f"fake hub: {status} at {fragment}"}
        if path == "/api/repos/create":
            p = json.loads(body)
            prefix = "datasets/" if p.get("type") == "dataset" else ""
            return 200, {"url": f"{self.url}/{prefix}{p['organization']}/{p['name']}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if "/commit/" in path:
            kind, owner, name = path.split("/")[2:5]
            prefix = "datasets/" if kind == "datasets" else ""
            return 200, {"commitUrl": f"{self.url}/{prefix}{owner}/{name}/commit/{'c' * 40}", "commitOid": "c" * 40}
        return 200, {}  # branch created

    def posts(self, fragment: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST" and fragment in r["path"]]

    def commit(self, path: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The commit POSTed to ``path``: its header and its files (path -> bytes); LFS pointers fail the test."""
        [request] = [r for r in self.requests if r["path"] == path]
        header, files = None, {}
        for line in request["body"].decode().splitlines():
            item = json.loads(line)
            assert item["key"] in ("header", "file"), item  # everything inline, no lfsFile
            if item["key"] == "header":
                header = item["value"]
            else:
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return header, files


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
MODEL_FILES = {"config.json": b'{"model_type": "llama", "vocab_size": 320}\n',
               "model.safetensors": bytes(range(256)) * 64,
               "generation_config.json": b'{"eos_token_id": 2}\n',
               "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
               "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}\n',
               "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
               "adapter/adapter_config.json": b'{"r": 16}\n'}
METRICS = [{"step": 1, "epoch": 0, "loss": 2.0, "lr": 1e-5, "eval_loss": 1.9, "tokens": 900},
           {"step": 2, "epoch": 0, "loss": 1.5, "lr": 2e-5, "tokens": 1800},
           {"step": 3, "epoch": 0, "loss": 1.25, "eval_loss": 1.125, "grad_norm": 0.5, "tokens": 2700,
            "tokens_per_s": 10096.14}]
SFT_REPORT = {"rows": 100, "used": 97, "skipped": {"empty": 2, "bad_role": 1}, "truncated": 4, "tokens": 12345,
              "packed_rows": 30, "total_steps": 3,
              "eval": {"source": "data.eval_fraction=0.1 of the prompts (seed 0)", "rows": 11, "used": 11,
                       "skipped": {}, "truncated": 0, "tokens": 781}}


def sft_recipe(out: Path, push: PushToHubConfig | None = None) -> SFTRecipe:
    cfg = SFTRecipe()
    cfg.model.path = "smollm2-135m-instruct"
    cfg.data.path, cfg.data.split = "HuggingFaceH4/ultrachat_200k", "train_sft"
    cfg.run.output_dir = str(out)
    if push is not None:
        cfg.run.push_to_hub = push
    return cfg


def make_stage_dir(out: Path, report: dict[str, Any] | None = None) -> Path:
    """A finished training stage's folder: model/, metrics.jsonl, data_report.json, curves.png."""
    for name, data in MODEL_FILES.items():
        (out / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "model" / name).write_bytes(data)
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (out / "data_report.json").write_text(json.dumps(report or SFT_REPORT))
    (out / "curves.png").write_bytes(PNG)
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# Cards, from hand-made configs, reports, metrics and summaries
# ---------------------------------------------------------------------------------------------------

def test_stage_card_front_matter_recipe_data_curves_and_final_metrics(tmp_path):
    card = stage_card("sft", to_dict(sft_recipe(tmp_path)), SFT_REPORT, METRICS, "me/zephyr-sft", curves=True)
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: transformers\n"
                           "license: apache-2.0\ntags:\n- zephyr-ray\n- sft\ndatasets:\n- HuggingFaceH4/ultrachat_200k\n"
                           "pipeline_tag: text-generation\n---\n\n# zephyr-sft\n")
    lines = card.splitlines()
    for line in ["| stage | dSFT (distilled supervised fine-tuning) |",
                 "| initial model | `HuggingFaceTB/SmolLM2-135M-Instruct` |",
                 "| fine-tuning | full |",
                 "| optimizer steps | 3 |",
                 "| learning rate | 2e-05 (cosine, warmup ratio 0.1) |",
                 "| batch per step | 8 x 1 accumulation x 2 workers = 16 rows |",
                 "| precision | bf16 |",
                 "| max length | 2048 tokens, packing true |",
                 "| source | role | rows read | rows used | skipped | truncated | tokens |",
                 "| HuggingFaceH4/ultrachat_200k (split train_sft) | training | 100 | 97 | 3 | 4 | 12345 |",
                 "| data.eval_fraction=0.1 of the prompts (seed 0) | held out | 11 | 11 | 0 | 0 | 781 |",
                 "![training curves](curves.png)",
                 "## Final metrics (step 3)",
                 "| eval_loss | 1.125 |", "| grad_norm | 0.5 |", "| loss | 1.25 |", "| tokens_per_s | 10096.1 |"]:
        assert line in lines, line
    # Bookkeeping columns are not results.
    assert not any(line.startswith(("| lr |", "| tokens |", "| epoch |")) for line in lines)


def test_dpo_card_of_a_local_lora_model_names_no_base_model():
    cfg = DPORecipe()
    cfg.model.path = "/nonexistent/runs/x/sft/model"  # a local folder is no Hub id: not in the front matter
    cfg.model.lora.enabled = True
    cfg.data.path = "/runs/x/aif/pairs.jsonl"
    card = stage_card("dpo", to_dict(cfg), None, [], "me/zephyr-dpo", curves=False)
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- zephyr-ray\n- dpo\n- lora\n"
                           "pipeline_tag: text-generation\n---\n")
    lines = card.splitlines()
    assert "| initial model | `/nonexistent/runs/x/sft/model` |" in lines
    assert "| fine-tuning | LoRA r=16, alpha=32, dropout=0.05, modules all-linear (merged into the weights) |" in lines
    assert "| DPO loss | sigmoid, beta 0.1, label smoothing 0 |" in lines
    assert "| reference model | the initial model (frozen) (log-probs: precompute) |" in lines
    assert "| /runs/x/aif/pairs.jsonl (split train) | training | n/a | n/a | n/a | n/a | n/a |" in lines
    assert "No metrics were logged." in lines and "![training curves](curves.png)" not in card
    cfg.dpo.length_normalize = True  # it changes what the reward is: the card says so
    card = stage_card("dpo", to_dict(cfg), None, [], "me/zephyr-dpo", curves=False)
    assert "| DPO loss | sigmoid, beta 0.1, label smoothing 0, length-normalised (reward per answer token) |" in \
        card.splitlines()


SUMMARY = {
    "run_id": "20261205-100854", "run_dir": "/runs/20261205-100854",
    "sft": {"steps": 7, "loss": 1.25, "eval_loss": 1.0},
    "aif": {"pairs": 16, "skipped": 1},
    "dpo": {"step": 8, "loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.25},
    "eval": {"mt_bench": {"dsft": {"overall": 5.5, "writing": 6.0, "math": 5.0, "parse_failures": 0},
                          "ddpo": {"overall": 6.25, "writing": 7.0, "math": 5.5, "parse_failures": 1}},
             "categories": ["writing", "math"],
             "win_rate": {"dsft": {"win_rate": 0.25, "standard_error": 0.05, "parse_failures": 0},
                          "ddpo": {"win_rate": 0.5, "standard_error": 0.125, "parse_failures": 0}},
             "reference": "gpt-4", "judge": "smollm2-judge", "judge_mode": "expected"},
}


def pipeline_config() -> dict[str, Any]:
    cfg = PipelineRecipe()
    cfg.sft.model.path = "smollm2-135m-instruct"
    cfg.sft.data.path = "data/sample/sft.jsonl"
    cfg.dpo.model.path = "/runs/20261205-100854/sft/model"
    return to_dict(cfg)


def test_pipeline_card_holds_the_evaluation_table():
    card = pipeline_card(pipeline_config(), SUMMARY, {"sft": SFT_REPORT}, "me/zephyr", "me/zephyr-aif-pairs",
                         images=["curves.png", "mt_bench_radar.png"])
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: transformers\n"
                           "license: apache-2.0\ntags:\n- zephyr-ray\n- sft\n- dpo\ndatasets:\n- me/zephyr-aif-pairs\n"
                           "pipeline_tag: text-generation\n---\n\n# zephyr\n")
    lines = card.splitlines()
    for line in ["### dSFT", "### dDPO", "| optimizer steps | 7 |", "| optimizer steps | 8 |",
                 "| initial model | the dSFT model above |",
                 "| data/sample/sft.jsonl (split train) | training | 100 | 97 | 3 | 4 | 12345 |",
                 "| AI-feedback pairs (me/zephyr-aif-pairs) (split train) | training | n/a | n/a | n/a | n/a | n/a |",
                 "| dSFT | loss | 1.25 |", "| dSFT | eval_loss | 1 |", "| dDPO | rewards/accuracies | 0.75 |",
                 "Judge: `smollm2-judge` (probability-weighted ratings).",
                 "| MT-Bench | dsft | ddpo |", "| overall | 5.5 | 6.25 |", "| writing | 6 | 7 |", "| math | 5 | 5.5 |",
                 "### Win rate against `gpt-4`", "| dsft | 25.0% | 5.0% |", "| ddpo | 50.0% | 12.5% |",
                 "![training curves](curves.png)", "![MT-Bench per category](mt_bench_radar.png)"]:
        assert line in lines, line
    assert any(line.startswith("AI feedback: 16 preference pairs (1 prompts skipped) from ") for line in lines)


def test_dataset_card():
    report = {"completions_per_model": {"dsft": {"completions": 16, "scored": 15, "mean_score": 2.5}}}
    card = dataset_card("me/zephyr-aif-pairs", "me/zephyr", report, 16)
    assert card.startswith("---\ntags:\n- zephyr-ray\n- dpo\n- preference\n- ai-feedback\ntask_categories:\n"
                           "- text-generation\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n"
                           "    path: pairs.jsonl\n---\n\n# zephyr-aif-pairs\n")
    assert "| dsft | 16 | 15 | 2.5 |" in card.splitlines()
    assert "The dDPO model trained on them: `me/zephyr`." in card


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

def test_push_config_is_validated_when_enabled():
    assert load_config(None, [], SFTRecipe).run.push_to_hub.enabled is False
    with pytest.raises(ConfigError, match=r"run\.push_to_hub\.repo_id=None: required"):
        load_config(None, ["run.push_to_hub.enabled=true"], SFTRecipe)
    with pytest.raises(ConfigError, match=r"run\.push_to_hub\.repo_id='zephyr': must name a Hub repo as owner/name"):
        load_config(None, ["run.push_to_hub.enabled=true", "run.push_to_hub.repo_id=zephyr"], DPORecipe)
    with pytest.raises(ConfigError, match=r"pipeline\.push_to_hub\.dataset_repo_id='me/a/b'"):
        load_config(None, ["pipeline.push_to_hub.enabled=true", "pipeline.push_to_hub.repo_id=me/zephyr",
                           "pipeline.push_to_hub.dataset_repo_id=me/a/b"], PipelineRecipe)
    ok = load_config(None, ["run.push_to_hub.enabled=true", "run.push_to_hub.repo_id=me/zephyr-7b.sft"], SFTRecipe)
    assert (ok.run.push_to_hub.repo_id, ok.run.push_to_hub.private, ok.run.push_to_hub.revision) == \
        ("me/zephyr-7b.sft", True, "main")


# ---------------------------------------------------------------------------------------------------
# Pushing with the real client
# ---------------------------------------------------------------------------------------------------

def test_push_stage_sends_repo_branch_files_card_and_token(hub, tmp_path):
    out = make_stage_dir(tmp_path / "sft")
    push = PushToHubConfig(enabled=True, repo_id="me/zephyr-sft", private=True, revision="dev")
    record = push_stage(sft_recipe(out, push), out)

    [create] = hub.posts("/api/repos/create")
    assert json.loads(create["body"]) == {"name": "zephyr-sft", "organization": "me", "visibility": "private", "type": "model"}
    assert len(hub.posts("/api/models/me/zephyr-sft/branch/dev")) == 1  # the revision's branch, created
    header, files = hub.commit("/api/models/me/zephyr-sft/commit/dev")
    assert header["summary"] == "zephyr-ray: sft model from sft"
    assert set(files) == {*MODEL_FILES, "README.md", "curves.png"}
    for name, data in MODEL_FILES.items():
        assert files[name] == data, name
    assert files["curves.png"] == PNG
    card = files["README.md"].decode()
    assert card == (out / CARD_FILE).read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "| loss | 1.25 |" in card.splitlines() and "![training curves](curves.png)" in card
    api_calls = [r for r in hub.requests if r["path"].startswith(("/api/repos", "/api/models", "/api/validate"))]
    assert api_calls and all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in api_calls)

    assert record == json.loads((out / PUSH_RECORD).read_text())
    assert record["status"] == "done" and record["commit"] == "c" * 40 and record["revision"] == "dev"
    assert record["url"] == f"{hub.url}/me/zephyr-sft"
    assert stage_push_record(sft_recipe(out, push)) == record
    assert push_exit_code([record]) == 0


def test_push_to_main_creates_no_branch_and_uses_the_configured_message(hub, tmp_path):
    out = make_stage_dir(tmp_path / "sft")
    push = PushToHubConfig(enabled=True, repo_id="me/zephyr-sft", private=False, commit_message="zephyr dSFT v1")
    push_model(out / "model", push, "---\ntags:\n- zephyr-ray\n---\n# card\n")
    assert json.loads(hub.posts("/api/repos/create")[0]["body"])["visibility"] == "public"
    assert not hub.posts("/branch/")
    header, files = hub.commit("/api/models/me/zephyr-sft/commit/main")
    assert header["summary"] == "zephyr dSFT v1"
    assert files["README.md"] == b"---\ntags:\n- zephyr-ray\n---\n# card\n"


@pytest.mark.parametrize("failure", ["500 at commit", "401 bad token"])
def test_a_failed_push_keeps_the_result_and_records_the_error(hub, tmp_path, monkeypatch, caplog, capsys, failure):
    out = make_stage_dir(tmp_path / "sft")
    before = digest(out / "model")
    if failure.startswith("500"):
        hub.fail["/commit/"] = 500
    else:
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    cfg = sft_recipe(out, PushToHubConfig(enabled=True, repo_id="me/zephyr-sft"))
    record = push_stage(cfg, out)  # does not raise

    assert digest(out / "model") == before
    assert (out / "metrics.jsonl").is_file() and (out / CARD_FILE).is_file()
    assert record == json.loads((out / PUSH_RECORD).read_text())
    assert record["status"] == "failed" and record["repo_id"] == "me/zephyr-sft"
    assert ("500" if failure.startswith("500") else "401") in record["error"]
    assert ("fake hub: 500 at /commit/" if failure.startswith("500") else "Invalid credentials") in record["error"]
    assert "me/zephyr-sft" in caplog.text and "failed" in caplog.text
    if failure.startswith("401"):
        assert not hub.posts("/commit/")
    assert push_exit_code([stage_push_record(cfg)]) == PUSH_FAILED_EXIT
    assert "push to the Hub failed, the local result is kept: me/zephyr-sft: " in capsys.readouterr().err


def test_disabled_push_does_nothing(hub, tmp_path):
    out = make_stage_dir(tmp_path / "sft")
    assert push_stage(sft_recipe(out), out) is None
    assert not (out / PUSH_RECORD).exists() and not hub.requests
    assert stage_push_record(sft_recipe(out)) is None


def test_push_dataset_goes_to_the_aif_pairs_repo(hub, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "hi", "chosen": [], "rejected": []}\n')
    record = push_dataset([pairs], PushToHubConfig(enabled=True, repo_id="me/zephyr"), "---\ntags:\n- x\n---\n")
    create = json.loads(hub.posts("/api/repos/create")[0]["body"])
    assert create == {"name": "zephyr-aif-pairs", "organization": "me", "visibility": "private", "type": "dataset"}
    _, files = hub.commit("/api/datasets/me/zephyr-aif-pairs/commit/main")
    assert files == {"pairs.jsonl": pairs.read_bytes(), "README.md": b"---\ntags:\n- x\n---\n"}
    assert record["repo_type"] == "dataset" and record["url"] == f"{hub.url}/datasets/me/zephyr-aif-pairs"


def make_pipeline_run(run_dir: Path) -> dict[str, Any]:
    """A finished pipeline run's folders and the manifest's ``stages``."""
    make_stage_dir(run_dir / "sft")
    make_stage_dir(run_dir / "dpo", {"rows": 16, "used": 16, "skipped": {}, "truncated": 0, "tokens": 2488})
    (run_dir / "aif").mkdir()
    (run_dir / "aif" / "pairs.jsonl").write_text('{"prompt": "What is 13 + 12?"}\n' * 3)
    (run_dir / "aif" / "aif_report.json").write_text(json.dumps({"completions_per_model": {}}))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "mt_bench_radar.png").write_bytes(PNG[::-1])
    return {"sft": {"status": "done", "artifacts": {"model": str(run_dir / "sft" / "model")}},
            "aif": {"status": "done", "artifacts": {"pairs": str(run_dir / "aif" / "pairs.jsonl"), "count": 3,
                                                    "report": str(run_dir / "aif" / "aif_report.json")}},
            "dpo": {"status": "done", "artifacts": {"model": str(run_dir / "dpo" / "model")}},
            "eval": {"status": "done", "artifacts": {"chart": str(run_dir / "eval" / "mt_bench_radar.png")}}}


def test_publish_pipeline_pushes_the_ddpo_model_with_eval_table_and_the_pairs(hub, tmp_path):
    stages = make_pipeline_run(tmp_path)
    push = PushToHubConfig(enabled=True, repo_id="me/zephyr", dataset_repo_id="me/zephyr-prefs")
    record = publish_pipeline(push, pipeline_config(), stages, SUMMARY)

    assert record["status"] == "done" and "error" not in record
    assert record["model"]["repo_id"] == "me/zephyr" and record["dataset"]["repo_id"] == "me/zephyr-prefs"
    header, files = hub.commit("/api/models/me/zephyr/commit/main")
    assert header["summary"] == "zephyr-ray: dDPO model of pipeline run 20261205-100854"
    assert set(files) == {*MODEL_FILES, "README.md", "curves.png", "mt_bench_radar.png"}
    assert files["mt_bench_radar.png"] == PNG[::-1]
    card = files["README.md"].decode().splitlines()
    assert "| overall | 5.5 | 6.25 |" in card and "| ddpo | 50.0% | 12.5% |" in card
    assert "- me/zephyr-prefs" in card
    _, data = hub.commit("/api/datasets/me/zephyr-prefs/commit/main")
    assert set(data) == {"pairs.jsonl", "aif_report.json", "README.md"}
    assert data["pairs.jsonl"] == (tmp_path / "aif" / "pairs.jsonl").read_bytes()
    assert push_exit_code(pipeline_push_records({"push": record, "stages": stages})) == 0


def test_publish_pipeline_records_a_failed_dataset_push_and_keeps_the_model_push(hub, tmp_path):
    stages = make_pipeline_run(tmp_path)
    hub.fail["/api/datasets/me/zephyr-aif-pairs/commit/"] = 500  # preupload would be retried with backoff (~20 s)
    record = publish_pipeline(PushToHubConfig(enabled=True, repo_id="me/zephyr"), pipeline_config(), stages, SUMMARY)
    assert record["model"]["status"] == "done"
    assert record["dataset"]["status"] == "failed" and record["dataset"]["repo_id"] == "me/zephyr-aif-pairs"
    assert record["status"] == "failed" and record["error"] == record["dataset"]["error"]
    assert (tmp_path / "aif" / "pairs.jsonl").is_file()
    assert push_exit_code(pipeline_push_records({"push": record, "stages": stages})) == PUSH_FAILED_EXIT


def test_pipeline_publishes_once_and_prints_the_push(hub, tmp_path):
    from zephyr_ray.pipeline import Manifest, _publish, summarize, summary_table

    stages = make_pipeline_run(tmp_path)
    for name in ("sft", "dpo"):
        stages[name]["artifacts"]["metrics"] = str(tmp_path / name / "metrics.jsonl")
    stages["aif"]["artifacts"]["skipped"] = 0
    stages["eval"]["status"] = "pending"
    cfg = PipelineRecipe()
    cfg.pipeline.push_to_hub = PushToHubConfig(enabled=True, repo_id="me/zephyr")
    manifest = Manifest(tmp_path / "manifest.json", {"run_id": "r1", "run_dir": str(tmp_path), "stages": stages})
    echoed: list[str] = []
    _publish(cfg, manifest, echoed.append)
    assert json.loads((tmp_path / "manifest.json").read_text())["push"]["status"] == "done"
    assert len(hub.posts("/commit/")) == 2
    _publish(cfg, manifest, echoed.append)  # done: a resumed run does not push again
    assert len(hub.posts("/commit/")) == 2
    table = summary_table(summarize(manifest)).splitlines()
    assert f"pushed the model to me/zephyr (revision main): {hub.url}/me/zephyr" in table
    assert f"pushed the dataset to me/zephyr-aif-pairs (revision main): {hub.url}/datasets/me/zephyr-aif-pairs" in table
