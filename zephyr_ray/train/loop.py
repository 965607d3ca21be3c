"""The training loop every stage runs inside its Ray Train workers.

The driver (``launch.run_stage``) hands Ray's ``TorchTrainer`` one picklable :class:`Stage`; the one
``train_loop_per_worker`` here rebuilds the stage's typed recipe from it, and from the recipe the engine and the
stage's :class:`~zephyr_ray.train.objectives.Objective` (how to collate a batch, how many loss units it holds,
and the summed loss). The loop owns streaming, accumulation, normalisation, metrics, checkpoints and resume.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch
import torch.distributed as dist

from zephyr_ray.attention import trains_one_row
from zephyr_ray.config import DPORecipe, SFTRecipe, TrainingRecipe, from_dict, to_dict
from zephyr_ray.data.tokenize import cached_tokenizer
from zephyr_ray.models import load_tokenizer
from zephyr_ray.tracking import WANDB_SERVICE_ENV, MetricsLogger
from zephyr_ray.train.engine import build_engine, deepspeed_config, export_hf
from zephyr_ray.train.objectives import Objective, build_objective, summarize

log = logging.getLogger(__name__)
DS_TAG = "ds"


@dataclass
class TrainerState:
    """Where training is: saved with every checkpoint, so a restart resumes the step and the data."""

    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # consumed by each worker in the current epoch
    samples: int = 0  # global, sequences (or pairs) trained on
    tokens: int = 0  # global, non-padding tokens


@dataclass
class StepPlan:
    """Fixed by the driver's planning pass; identical on every worker."""

    total_steps: int
    micro_batches_per_epoch: int


# The training stages by kind: the typed recipe a worker rebuilds from a :class:`Stage`.
RECIPES: dict[str, type[TrainingRecipe]] = {"sft": SFTRecipe, "dpo": DPORecipe}


@dataclass(frozen=True)
class Stage:
    """Everything a training worker needs, passed once to the ``TorchTrainer``: which stage (``kind``, a key of
    ``RECIPES``) with which values (``recipe``: the plain dict, rebuilt and validated on the worker), the model
    it starts from, the driver's step plan and each rank's share of the held-out rows (``launch.eval_shares``)."""

    kind: str
    recipe: dict[str, Any]
    model_path: str
    plan: StepPlan
    eval_shares: list[tuple[Any, bool]] | None = None

    @classmethod
    def of(cls, cfg: TrainingRecipe, model_path: str, plan: StepPlan,
           eval_shares: list[tuple[Any, bool]] | None = None) -> Stage:
        kinds = [kind for kind, schema in RECIPES.items() if type(cfg) is schema]
        if not kinds:
            raise TypeError(f"{type(cfg).__name__} is not a training stage's recipe ({sorted(RECIPES)})")
        return cls(kinds[0], to_dict(cfg), model_path, plan, eval_shares)

    def typed_recipe(self) -> TrainingRecipe:
        return from_dict(self.recipe, RECIPES[self.kind])


def _all_sum(values: list[float], device: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _has_frozen(engine: Any) -> bool:
    """LoRA freezes the base. Checkpoints leave frozen weights out (a 7B base would be written at every
    checkpoint, twice under ZeRO-2): a restart loads them from the model folder, as the first start did."""
    return any(not p.requires_grad for p in engine.module.parameters())


COMPLETE = "COMPLETE"  # a checkpoint's completion marker, written last (atomically) by rank 0


def ray_storage(cfg: TrainingRecipe) -> str:
    """Ray Train's storage: ``run.storage_path``, else ``<output_dir>/ray`` (absolute unless a URI)."""
    storage = cfg.run.storage_path or str(Path(cfg.run.output_dir, "ray"))
    return storage if "://" in storage else os.path.abspath(storage)


def checkpoint_root(cfg: TrainingRecipe) -> str:
    """Where the run's checkpoints go: ``<storage>/<run.name>/checkpoints/step_N``, next to Ray's own files,
    so on a cluster they are on the storage every node sees."""
    return f"{ray_storage(cfg).rstrip('/')}/{cfg.run.name}/checkpoints"


def checkpoint_storage(root: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the checkpoint folder ``root`` (a local path or a URI such as s3://)."""
    if "://" in root:
        return pyarrow.fs.FileSystem.from_uri(root)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(root)


def _step_dirs(fs: Any, base: str) -> dict[int, str]:
    found = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
        name = info.base_name
        if info.type == pyarrow.fs.FileType.Directory and name.startswith("step_") and name[5:].isdigit():
            found[int(name[5:])] = info.path
    return found


def _files(fs: Any, path: str) -> dict[str, int]:
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:]: i.size for i in infos
            if i.type == pyarrow.fs.FileType.File and not i.base_name.startswith((COMPLETE, ".tmp"))}


def is_complete(fs: Any, path: str) -> bool:
    """Has the marker, and every file it lists is there with its size (a file cut off later is caught too)."""
    marker = f"{path}/{COMPLETE}"
    if fs.get_file_info(marker).type != pyarrow.fs.FileType.File:
        return False
    try:
        with fs.open_input_stream(marker) as f:
            listed = json.loads(f.read().decode())["files"]
    except (ValueError, KeyError, OSError):
        return False
    present = _files(fs, path)
    return all(present.get(name) == size for name, size in listed.items())


def newest_complete(root: str) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint under ``root``, or None."""
    fs, base = checkpoint_storage(root)
    for step, path in sorted(_step_dirs(fs, base).items(), reverse=True):
        if is_complete(fs, path):
            return step, path
    return None


def _write_atomic(fs: Any, path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)  # a rename on a filesystem; one object PUT (already atomic) on object stores


def prune_checkpoints(root: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints, and every incomplete one older than the
    newest complete (a killed attempt's leftovers). Returns the deleted steps."""
    fs, base = checkpoint_storage(root)
    dirs = _step_dirs(fs, base)
    complete = [s for s in sorted(dirs, reverse=True) if is_complete(fs, dirs[s])]
    newest = complete[0] if complete else None
    doomed = complete[max(keep, 1):] + [s for s in dirs if s not in complete and newest is not None and s < newest]
    for step in doomed:
        fs.delete_dir(dirs[step])
    return sorted(doomed)


def save_checkpoint(engine: Any, state: TrainerState, metrics: dict[str, Any], root: str, keep: int) -> None:
    """Our completion protocol (Ray Train registers a checkpoint only once its controller has every worker's
    report, so a hard kill of one worker loses finished ones): every rank writes its DeepSpeed shards to
    ``root/step_N``, then after a barrier rank 0 writes the ``COMPLETE`` marker (with each file's size) last,
    atomically, and prunes to ``keep``. Only then are the metrics reported."""
    fs, base = checkpoint_storage(root)
    path = f"{base}/step_{state.step:08d}"
    kwargs = {"tag": DS_TAG, "client_state": {"trainer_state": asdict(state)},
              "exclude_frozen_parameters": _has_frozen(engine)}
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        engine.save_checkpoint(path, **kwargs)
    else:  # object store: write locally, upload this rank's files
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, **kwargs)
            pyarrow.fs.copy_files(d, path, destination_filesystem=fs)
    dist.barrier()
    if dist.get_rank() == 0:
        files = _files(fs, path)
        _write_atomic(fs, f"{path}/{COMPLETE}", json.dumps({"step": state.step, "world": dist.get_world_size(),
                                                             "time": time.time(), "files": files}))
        prune_checkpoints(root, keep)
    ray.train.report(metrics)


def restore_checkpoint(engine: Any, root: str) -> TrainerState | None:
    """Load the newest complete checkpoint under ``root`` (rank 0 picks, everyone loads the same one);
    incomplete ones are never loaded, and rank 0 deletes them. One Ray hands back is used only when ``root``
    holds none (a run checkpointed by an older version)."""
    choice = [newest_complete(root) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    found = choice[0]
    if dist.get_rank() == 0:
        fs, base = checkpoint_storage(root)
        for step, path in _step_dirs(fs, base).items():
            if found is None or (step != found[0] and not is_complete(fs, path)):
                log.warning("deleting incomplete checkpoint %s", path)
                fs.delete_dir(path)
    if found is not None:
        ckpt = ray.train.Checkpoint(found[1], filesystem=checkpoint_storage(root)[0])
    else:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=not _has_frozen(engine))
    return TrainerState(**client["trainer_state"])


def eval_batches(table: Any, micro_batch_size: int) -> list[dict[str, list]]:
    """A rank's held-out rows (a pyarrow table) as micro-batches of columns, for ``Objective.collate``."""
    return [table.slice(i, micro_batch_size).to_pydict() for i in range(0, table.num_rows, micro_batch_size)]


def evaluate(engine: Any, objective: Objective, batches: list[dict[str, list]], counted: bool) -> dict[str, float]:
    """``eval_<key>`` for the loss and every extra of ``objective``, each the mean over every held-out unit (tokens,
    pairs) of all ranks together: each rank sums over its share, then one all-reduce. No gradient, eval mode.
    Every rank runs as many forward passes as the busiest (ZeRO-3 gathers parameters collectively): one short of
    batches (or holding only a stand-in row, ``counted`` false) repeats its first one with weight 0."""
    device = engine.device
    passes = torch.tensor([len(batches)], device=device)
    dist.all_reduce(passes, op=dist.ReduceOp.MAX)
    units = torch.zeros((), dtype=torch.float64, device=device)
    sums: dict[str, torch.Tensor] = {}
    engine.eval()
    try:
        with torch.no_grad():
            for i in range(int(passes.item())):
                weight = 1.0 if counted and i < len(batches) else 0.0
                batch = objective.collate(batches[i] if i < len(batches) else batches[0])
                units += weight * objective.units(batch)
                loss, extras = objective.loss(engine, _to(batch, device))
                for k, v in {"loss": loss, **extras}.items():
                    sums[k] = sums.get(k, 0.0) + weight * v.detach().double()
    finally:
        engine.train()
    keys = sorted(sums)
    totals = torch.stack([units, *(sums[k] for k in keys)])
    dist.all_reduce(totals)
    n, *values = totals.tolist()
    means = summarize(objective, {k: v / max(n, 1.0) for k, v in zip(keys, values, strict=True)})
    return {f"eval_{k}": v for k, v in means.items()}


def train_epochs(engine: Any, objective: Objective, shard: Any, cfg: TrainingRecipe, plan: StepPlan, state: TrainerState,
                 resumed: bool, logger: Any, trace: Path | None, eval_fn: Callable[[], dict[str, float]] | None = None
                 ) -> TrainerState:
    """Run optimizer steps until ``plan.total_steps`` or the data's end, checkpointing as configured; with
    ``eval_fn`` (the eval metrics), evaluating every ``train.eval_every`` steps and at the last, into that step's
    metrics."""
    tc = cfg.train
    device = engine.device
    world = dist.get_world_size()
    gas = tc.gradient_accumulation_steps
    eval_every = tc.eval_every or max(1, plan.total_steps // 10)
    for epoch in range(state.epoch, tc.epochs):
        batches = iter(shard.iter_torch_batches(batch_size=tc.micro_batch_size, collate_fn=objective.collate,
                                                prefetch_batches=2))
        for _ in islice(batches, state.micro_batches_in_epoch):
            pass  # already trained on before the restart
        while state.step < plan.total_steps:
            t0 = time.perf_counter()
            group = list(islice(batches, gas))
            if not group:
                break
            units, tokens, samples = _all_sum(
                [sum(objective.units(b) for b in group), sum(b["num_tokens"] for b in group),
                 sum(len(ids) for b in group for ids in b["sample_ids"])], device)
            # DeepSpeed divides by gas and averages over ranks; this makes the step's gradient the mean
            # over every unit in the global batch, however they are spread across micro-batches.
            scale = world * gas / max(units, 1.0)
            # Sums stay on the device until one all-reduce per step (no host sync per micro-batch).
            sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(group):
                batch = _to(batch, device)
                engine.set_gradient_accumulation_boundary(i == len(group) - 1)
                loss, extras = objective.loss(engine, batch)
                engine.backward(loss * scale)
                for k, v in {"loss": loss, **extras}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
            lr = engine.get_lr()[0]
            engine.step()
            keys = sorted(sums)
            totals = torch.stack([sums[k] for k in keys])
            dist.all_reduce(totals)
            means = summarize(objective, {k: v / max(units, 1.0) for k, v in zip(keys, totals.tolist())})
            elapsed = time.perf_counter() - t0
            state.step += 1
            state.micro_batches_in_epoch += len(group)
            state.samples += int(samples)
            state.tokens += int(tokens)
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": state.step, "epoch": epoch, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens / elapsed, "samples": state.samples, "tokens": state.tokens,
                "step_time_s": elapsed, **means,
            }
            if eval_fn is not None and (state.step % eval_every == 0 or state.step == plan.total_steps):
                t_eval = time.perf_counter()
                metrics.update(eval_fn())
                metrics["eval_runtime"] = time.perf_counter() - t_eval  # TRL's name: seconds of the evaluation
            if logger is not None:
                logger.log(metrics)
            if trace is not None:
                with trace.open("a") as f:
                    f.write(json.dumps({"step": state.step, "ids": [i for b in group for s in b["sample_ids"] for i in s]}) + "\n")
            if state.step % tc.checkpoint_every == 0 or state.step == plan.total_steps:
                save_checkpoint(engine, state, metrics, checkpoint_root(cfg), tc.keep_checkpoints)
            if tc.inject_failure_at_step == state.step and not resumed:
                raise RuntimeError(f"injected failure after step {state.step} (train.inject_failure_at_step)")
        if state.step >= plan.total_steps:
            break
        state.epoch, state.micro_batches_in_epoch = epoch + 1, 0
    return state


def truncate_trace(trace: Path, step: int) -> None:
    """Drop trace lines of steps the restart rolled back."""
    if trace.exists():
        kept = [line for line in trace.read_text().splitlines() if json.loads(line)["step"] <= step]
        trace.write_text("".join(line + "\n" for line in kept))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` of every stage: ``config["stage"]`` (a :class:`Stage`) → the typed
    recipe → engine, objective (``build_objective``; packed micro-batches as one unpadded row when the model's
    attention allows it), restore, loop, final export."""
    extensions_cache()
    stage: Stage = config["stage"]
    cfg = stage.typed_recipe()
    model_path, plan = stage.model_path, stage.plan
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.scaling.threads_per_worker:
        torch.set_num_threads(cfg.scaling.threads_per_worker)
    out = Path(cfg.run.output_dir)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.train, world)
    engine = build_engine(model_path, cfg.train, ds_cfg, plan.total_steps, cfg.model)
    engine.train()
    objective = build_objective(cfg, cached_tokenizer(model_path).pad_token_id,
                                trains_one_row(engine.module, cfg.data.packing), model_path=model_path,
                                device=engine.device)
    restored = restore_checkpoint(engine, checkpoint_root(cfg))
    state = restored or TrainerState()
    if restored and rank == 0:
        log.info("resumed at step %d (epoch %d, micro-batch %d)", state.step, state.epoch, state.micro_batches_in_epoch)
        with (out / "restarts.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.time(), **asdict(state)}) + "\n")
    trace = None
    if cfg.train.trace_samples:
        trace = out / "samples" / f"rank{rank}.jsonl"
        trace.parent.mkdir(parents=True, exist_ok=True)
        truncate_trace(trace, state.step)
    eval_fn = None
    if stage.eval_shares:  # this rank's share of the held-out rows (launch.eval_shares)
        ref, counted = stage.eval_shares[rank]
        batches = eval_batches(ray.get(ref), cfg.train.micro_batch_size)
        eval_fn = functools.partial(evaluate, engine, objective, batches, counted)
    # A Ray worker inherits the environment of the process that started the raylet. If that process had used W&B
    # (a notebook, the pytest session), WANDB_SERVICE names its W&B service, which outlives this worker: after a
    # kill -9 the attempt's run stays open there and the resumed attempt's run (the same id) is refused ("run ID
    # ... is in use"). This worker starts its own service instead.
    os.environ.pop(WANDB_SERVICE_ENV, None)
    logger = MetricsLogger(out, cfg.wandb, cfg.run.name, stage.recipe, state.step) if rank == 0 else None
    try:
        train_epochs(engine, objective, ray.train.get_dataset_shard("train"), cfg, plan, state, restored is not None,
                     logger, trace, eval_fn)
        export_hf(engine, load_tokenizer(model_path, chat_template=cfg.model.chat_template), out / "model", rank == 0)
    finally:
        if logger is not None:
            logger.close()


def extensions_cache() -> str:
    """Where DeepSpeed JIT-builds its ops; a persistent cache so only the first run pays (~40 s)."""
    path = os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zephyr-ray" / "torch_extensions"))
    return path
