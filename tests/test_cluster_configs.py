"""The cluster configs in cluster/: Ray's own validation plus the properties the recipe depends on.

Pure and fast: nothing is launched, no Ray cluster is started. The cluster launcher YAMLs go through what
`ray up` does before it touches a cloud (ray.autoscaler._private.commands._bootstrap_config):
``prepare_config`` (merge with the provider's defaults.yaml, merge setup commands, check the docker
section, fill per-type min/max workers) then ``validate_config`` (ray/autoscaler/ray-schema.json plus
Ray's cross-field checks). The KubeRay manifests go through the function Ray's in-tree KubeRay
autoscaler uses to turn a RayCluster into its autoscaling config (which calls ``validate_config`` too),
and the RayJob's runtime_env through ``ray.runtime_env.RuntimeEnv``.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY_YAMLS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared-pvc.yaml"]
SHARED = "/mnt/shared"  # where configs/zephyr-7b-beta/*.yaml put run folders and checkpoints
# rayproject/ray:<installed ray>-py311-cu12x: Ray's CUDA 12 images for Python 3.11 (ray-ml is gone).
IMAGE_RE = re.compile(rf"^rayproject/ray:{re.escape(ray.__version__)}-py311-cu12\d$")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_up_validate(raw: dict) -> dict:
    """The offline part of `ray up`'s config handling; raises on an invalid config."""
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def walk(node):
    """Every (key, value) pair in a nested YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def images(doc: dict) -> list[str]:
    return [v for k, v in walk(doc) if k in ("image", "head_image", "worker_image")]


def recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "zephyr-7b-beta" / f"{name}.yaml").read_text())


def head_and_workers(cfg: dict) -> tuple[dict, dict]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    return head, {name: t for name, t in types.items() if name != cfg["head_node_type"]}


# ---------------------------------------------------------------------------------------------------------
# Cluster launcher YAMLs (ray up)


@pytest.fixture(params=LAUNCHER_YAMLS)
def launcher(request) -> tuple[dict, dict]:
    raw = load(request.param)
    return raw, ray_up_validate(raw)


def test_launcher_yaml_passes_rays_validation(launcher):
    raw, cfg = launcher
    assert raw["provider"]["type"] in ("aws", "gcp")
    # The settings the autoscaler's behaviour depends on are spelled out, not inherited from defaults.
    for key in ("max_workers", "upscaling_speed", "idle_timeout_minutes", "file_mounts", "docker"):
        assert key in raw, key
    assert raw["idle_timeout_minutes"] > 0 and raw["upscaling_speed"] > 0


def test_launcher_image_pinned_to_installed_ray(launcher):
    raw, _ = launcher
    found = images(raw)
    assert found, "no docker image"
    for image in found:
        assert IMAGE_RE.match(image), f"{image} is not rayproject/ray:{ray.__version__}-py311-cu12x"


def test_head_runs_no_tasks_and_has_no_gpu(launcher):
    _, cfg = launcher
    head, _ = head_and_workers(cfg)
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_gpu_worker_types(launcher):
    _, cfg = launcher
    _, workers = head_and_workers(cfg)
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert set(gpu_types) == {name for name in workers if "gpu" in name}, "a gpu-named type lacks GPUs"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] >= 1, name
    # Every type can reach its own max at once.
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    gpus = sorted(t["resources"]["GPU"] for t in gpu_types.values())
    assert gpus[0] == 1 and gpus[-1] >= 8, gpus


def test_worker_types_fit_the_7b_recipe(launcher):
    """dSFT/dDPO need their 8 train workers on one 8-GPU node; each vLLM actor needs a 1-GPU node."""
    _, cfg = launcher
    _, workers = head_and_workers(cfg)
    big = max(workers.values(), key=lambda t: t["resources"].get("GPU", 0))["resources"]
    for stage in ("sft", "dpo"):
        s = recipe(stage)["scaling"]
        assert big["GPU"] >= s["num_workers"] * s["gpus_per_worker"], stage
        assert big["CPU"] >= s["num_workers"] * s["cpus_per_worker"], stage
    engine = recipe("generate")["engine"]
    single = [t["resources"] for t in workers.values() if t["resources"].get("GPU") == 1]
    assert single and all(r["CPU"] >= engine["num_cpus_per_actor"] for r in single)
    n_gpu = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers.values())
    assert n_gpu >= engine["num_actors"] * engine["num_gpus_per_actor"]


def test_setup_installs_the_project_with_the_gpu_extra(launcher):
    raw, cfg = launcher
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras
    # The folder synced from the repository root is the one installed.
    repo_mounts = [remote for remote, local in raw["file_mounts"].items() if local in (".", "./")]
    assert len(repo_mounts) == 1
    for merged in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        pip = [c for c in merged if "pip install" in c and "[gpu]" in c]
        assert pip, merged
        assert any(f"{repo_mounts[0]}[gpu]" in c for c in pip), pip
        # Ray pinned to the image's version so nothing upgrades it under the running cluster.
        assert any(re.search(rf"ray\[[^\]]*\]=={re.escape(ray.__version__)}\b", c) for c in pip), pip


def test_shared_storage_mounted_where_the_recipes_write(launcher):
    raw, _ = launcher
    init = " ".join(raw["initialization_commands"])
    assert "mount" in init and SHARED in init
    assert any(f"{SHARED}:{SHARED}" in opt for opt in raw["docker"]["run_options"])
    for path in (ROOT / "configs" / "zephyr-7b-beta").glob("*.yaml"):
        for key, value in walk(yaml.safe_load(path.read_text())):
            if (
                key in ("output_dir", "storage_path", "runs_dir")
                and isinstance(value, str)
                and "://" not in value
            ):
                assert value.startswith(SHARED + "/"), f"{path.name}: {key}={value} is not on shared storage"


def test_token_auth_on_every_node(launcher):
    """RAY_AUTH_MODE=token on head and workers, the token file synced to every node by file_mounts."""
    raw, _ = launcher
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(raw[section])
        assert "RAY_AUTH_MODE=token" in start, section
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", start).group(1)
        assert any(token_path.startswith(remote.rstrip("/") + "/") for remote in raw["file_mounts"]), (
            token_path
        )


# Negative: a broken copy must be rejected, or the checks above prove nothing.


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(not_a_ray_key=1), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="many"), id="max_workers-not-int"),
        pytest.param(lambda c: c.update(idle_timeout_minutes=-5), id="negative-idle-timeout"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_8x_a100"]["resources"].update(GPU="8"),
            id="gpu-as-string",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_8x_a100"].pop("node_config"), id="no-node-config"
        ),
        pytest.param(lambda c: c["docker"].update(imagee="typo"), id="unknown-docker-key"),
    ],
)
@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_broken_launcher_yaml_is_rejected_by_ray_schema(name, breakage):
    broken = load(name)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        ray_up_validate(broken)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_head_node_type_must_exist_and_min_workers_fit(name):
    broken = load(name)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_up_validate(broken)
    broken = load(name)
    broken["available_node_types"]["gpu_8x_a100"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        ray_up_validate(broken)


# ---------------------------------------------------------------------------------------------------------
# KubeRay manifests


def kuberay_docs() -> dict[str, dict]:
    docs = {}
    for name in KUBERAY_YAMLS:
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def cluster_specs() -> dict[str, dict]:
    docs = kuberay_docs()
    return {"RayCluster": docs["RayCluster"]["spec"], "RayJob": docs["RayJob"]["spec"]["rayClusterSpec"]}


def pvc_name() -> str:
    pvc = kuberay_docs()["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    return pvc["metadata"]["name"]


def check_cluster_spec(spec: dict) -> None:
    """The structure the recipe needs from a RayCluster spec; AssertionError names what is wrong."""
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token"
    claim = pvc_name()

    def shared_mount(pod_spec: dict, container: dict) -> str:
        volumes = {
            v["name"]
            for v in pod_spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        }
        paths = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes]
        assert len(paths) == 1, f"{container['name']}: PVC {claim} not mounted once"
        return paths[0]

    def secret_env(container: dict) -> set[str]:
        return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}

    head_pod = spec["headGroupSpec"]["template"]["spec"]
    head = head_pod["containers"][0]
    assert IMAGE_RE.match(head["image"]), head["image"]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    mount = shared_mount(head_pod, head)
    assert mount == SHARED
    assert {"WANDB_API_KEY", "HF_TOKEN"} <= secret_env(head)

    groups = spec["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names) and all(names)
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] >= 1, g["groupName"]
        pod = g["template"]["spec"]
        worker = pod["containers"][0]
        assert IMAGE_RE.match(worker["image"]), worker["image"]
        assert int(worker["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1, g["groupName"]
        assert shared_mount(pod, worker) == mount, g["groupName"]
        assert {"WANDB_API_KEY", "HF_TOKEN"} <= secret_env(worker), g["groupName"]
    gpus = sorted(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups
    )
    assert gpus[0] == 1 and gpus[-1] >= 8, gpus


def test_kuberay_kinds_and_api_versions():
    docs = kuberay_docs()
    assert set(docs) == {"RayCluster", "RayJob", "PersistentVolumeClaim"}
    assert docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert docs["RayJob"]["apiVersion"] == "ray.io/v1"
    assert docs["PersistentVolumeClaim"]["apiVersion"] == "v1"


def test_kuberay_images_pinned_to_installed_ray():
    for name in KUBERAY_YAMLS:
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            for image in images(doc or {}):
                assert IMAGE_RE.match(image), f"{name}: {image}"
    assert images(kuberay_docs()["RayJob"])


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_spec_structure(kind):
    check_cluster_spec(cluster_specs()[kind])


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_spec_through_rays_autoscaler_config(kind):
    """What Ray's in-tree KubeRay autoscaler derives from the spec (validate_config runs inside)."""
    cfg = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "zephyr-ray", "namespace": "default"}, "spec": cluster_specs()[kind]}
    )
    head, workers = head_and_workers(cfg)
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1 and t["min_workers"] <= t["max_workers"], name
    big = max(workers.values(), key=lambda t: t["resources"]["GPU"])["resources"]
    s = recipe("sft")["scaling"]
    assert big["GPU"] >= s["num_workers"] * s["gpus_per_worker"]
    assert big["CPU"] >= s["num_workers"] * s["cpus_per_worker"]


def test_rayjob_runs_the_pipeline_and_cleans_up():
    job = kuberay_docs()["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    assert script.startswith("jobs/") and ((ROOT / script).is_file() or script == "jobs/pipeline.py"), script
    config = argv[argv.index("--config") + 1]
    assert config.startswith("configs/") and (
        (ROOT / config).is_file() or config == "configs/zephyr-7b-beta/pipeline.yaml"
    ), config


def test_rayjob_runtime_env_is_valid_and_brings_the_project():
    from ray.runtime_env import RuntimeEnv

    job = kuberay_docs()["RayJob"]["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own parsing/validation of every field
    assert env["working_dir"].endswith(".zip") and "://" in env["working_dir"]
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert any(p.startswith("zephyr-ray[gpu]") for p in packages), packages
    # Secrets come from the Kubernetes Secret, never from the runtime_env (it shows in the dashboard).
    assert not {"WANDB_API_KEY", "HF_TOKEN", "OPENAI_API_KEY"} & set(env.get("env_vars", {}))


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda s: s["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2), id="min>max"),
        pytest.param(lambda s: s.update(enableInTreeAutoscaling=False), id="no-autoscaler"),
        pytest.param(
            lambda s: s["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].pop("nvidia.com/gpu"),
            id="worker-without-gpu",
        ),
        pytest.param(
            lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0].update(
                mountPath="/data"
            ),
            id="shared-volume-elsewhere",
        ),
        pytest.param(
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                image="rayproject/ray:latest"
            ),
            id="unpinned-image",
        ),
    ],
)
def test_broken_kuberay_spec_is_rejected(breakage):
    spec = copy.deepcopy(cluster_specs()["RayCluster"])
    breakage(spec)
    with pytest.raises(AssertionError):
        check_cluster_spec(spec)
