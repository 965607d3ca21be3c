"""Logit-level distillation in dSFT (``sft.distill``): the student also learns the teacher's next-token distribution.

Before training, Ray actors hosting the teacher stream the packed training rows once and add, at every position
whose next token is trained, the teacher's top-k token ids and log-probs (``frozen_pass``: Parquet in the run
folder, reused by a rerun with the same settings). The workers train on exactly those rows and never hold the
teacher. Teacher and student must share a tokenizer: the teacher's ids index the student's logits.

This is the driver side (the tokenizer check, the teacher's pass); the workers' objective is
``objectives.DistillObjective``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig, AutoTokenizer

from zephyr_ray.attention import allows_one_row
from zephyr_ray.config import ConfigError, SFTRecipe, to_dict
from zephyr_ray.data.packing import collate
from zephyr_ray.data.tokenize import cached_tokenizer
from zephyr_ray.models import DTYPES, resolve_model_path
from zephyr_ray.train.frozen import FrozenModel, frozen_pass, pass_dir
from zephyr_ray.train.losses import label_logits, teacher_topk
from zephyr_ray.train.objectives import TEACHER_IDS, TEACHER_LOGPS


def tokenizer_differences(teacher: str, student: str, revision: str | None = None,
                          trust_remote_code: bool = False) -> list[str]:
    """What keeps ``teacher`` from scoring ``student``'s token ids as its own: another vocabulary (token → id,
    added tokens included), other BOS/EOS/UNK ids, or an output wider than the student's logits."""
    tok = {name: AutoTokenizer.from_pretrained(path, revision=rev, trust_remote_code=trust_remote_code)
           for name, path, rev in (("teacher", teacher, None), ("student", student, revision))}
    out = []
    tv, sv = tok["teacher"].get_vocab(), tok["student"].get_vocab()
    if tv != sv:
        moved = sorted(t for t in tv.keys() & sv.keys() if tv[t] != sv[t])
        example = f", e.g. {moved[0]!r}: {tv[moved[0]]} vs {sv[moved[0]]}" if moved else ""
        out.append(f"vocabulary: {len(tv)} vs {len(sv)} tokens, {len(tv.keys() - sv.keys())} only in the teacher, "
                   f"{len(sv.keys() - tv.keys())} only in the student, {len(moved)} with other ids{example}")
    for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        a, b = (getattr(tok[side], name) for side in ("teacher", "student"))
        if a != b:
            out.append(f"{name}: {a} vs {b}")
    sizes = [output_size(teacher, None, trust_remote_code), output_size(student, revision, trust_remote_code)]
    if sizes[0] > sizes[1]:
        out.append(f"output size: the teacher's {sizes[0]} exceeds the student's {sizes[1]}")
    return out


def output_size(path: str, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """How many logits the model at ``path`` has per position (its config's vocab_size)."""
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return config.get_text_config().vocab_size


def check_teacher(teacher: str, student: str, cfg: SFTRecipe) -> None:
    """Raise ``ConfigError`` naming both models and what differs unless they share a tokenizer (and the teacher
    has ``distill.top_k`` tokens to give)."""
    problems = tokenizer_differences(teacher, student, cfg.model.revision, cfg.model.trust_remote_code)
    if problems:
        raise ConfigError(f"distill.teacher {teacher} and the student {student} do not share a tokenizer "
                          f"({'; '.join(problems)}); distillation needs a teacher with the student's tokenizer")
    vocab = output_size(teacher, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.distill.top_k > vocab:
        raise ConfigError(f"distill.top_k={cfg.distill.top_k} exceeds the vocabulary of the teacher {teacher} ({vocab})")


class TeacherTopK(FrozenModel):
    """Ray Data actor: the teacher adding ``TEACHER_IDS``/``TEACHER_LOGPS`` to packed SFT rows, at the positions
    ``label_logits`` keeps (the same packing inputs as the student's forward)."""

    def __init__(self, path: str, pad_id: int, top_k: int, temperature: float, dtype: str, attn: str,
                 threads: int | None = None):
        super().__init__(path, dtype, attn, threads)
        self.pad_id, self.top_k, self.temperature = pad_id, top_k, temperature

    def columns(self, rows: dict[str, list]) -> dict[str, pa.Array]:
        flat = allows_one_row(self.model)
        batch = collate(rows, self.pad_id, one_row=flat)
        logits, _, keep = label_logits(self.model, self.on_device(batch))
        logps, ids = teacher_topk(logits, self.top_k, self.temperature)
        lengths = batch["row_lengths"]
        per_row = torch.stack([k.sum() for k in keep[0, :sum(lengths)].split(lengths)]) if flat else keep.sum(1)
        offsets = pa.array(np.concatenate([[0], per_row.cumsum(0).cpu().numpy() * self.top_k]), pa.int32())
        return {TEACHER_IDS: pa.ListArray.from_arrays(offsets, pa.array(ids.cpu().numpy().ravel().astype(np.int32))),
                TEACHER_LOGPS: pa.ListArray.from_arrays(offsets, pa.array(logps.cpu().numpy().ravel()))}


def add_teacher_topk(dataset: Any, model_path: str, out: Path, split: str = "train", *, teacher: str,
                     cfg: SFTRecipe) -> Any:
    """``run_stage``'s ``prepare``: the training rows with the teacher's top-k, under ``out/teacher_topk`` (the
    held-out rows, ``split="eval"``: ``out/teacher_topk_eval``)."""
    d = cfg.distill
    kwargs = {"path": teacher, "pad_id": cached_tokenizer(model_path).pad_token_id, "top_k": d.top_k,
              "temperature": d.temperature, "dtype": DTYPES[cfg.train.precision],
              "attn": cfg.model.attn_implementation}
    fingerprint = {"teacher": teacher, "student": model_path, "data": to_dict(cfg.data), "top_k": d.top_k,
                   "temperature": d.temperature, "precision": cfg.train.precision, "attn": cfg.model.attn_implementation,
                   "split": split}
    return frozen_pass(dataset, TeacherTopK, kwargs, d, pass_dir(out, "teacher_topk", split), fingerprint)


def teacher_prepare(cfg: SFTRecipe) -> Any:
    """The ``prepare`` step of a distilling dSFT run, after checking on the driver (before any work) that the
    teacher shares the student's tokenizer. A tiny teacher (``teacher_tiny_seed``) is built under the run folder."""
    out = Path(cfg.run.output_dir)
    student = resolve_model_path(cfg.model.path, out, cfg.model.tiny_seed, cfg.model.tiny_arch)
    teacher = resolve_model_path(cfg.distill.teacher, out / "teacher", cfg.distill.teacher_tiny_seed,
                                 cfg.model.tiny_arch)
    check_teacher(teacher, student, cfg)
    return functools.partial(add_teacher_topk, teacher=teacher, cfg=cfg)
