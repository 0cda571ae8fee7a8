"""Resuming a run from its own settings: ``resume_config(run_dir, changes)``.

A run directory's config.json (written when the run starts; the checkpoint's metadata holds the same) records
the resolved TrainConfig. A resumed run takes every setting from there; ``changes`` may only set the fields that
leave the run the same run (RESUMABLE_CHANGES: steps, save / log intervals, device, threads, workers, ...). A
change to any other field (dataset, batch size, seed, ...) is refused by name, because "continue exactly" would
silently stop meaning that.
"""
import dataclasses
import json
import os
from typing import Callable, Optional

from ..checkpoint import RUN_CHECKPOINT
from .config import RESUMABLE_CHANGES, TrainConfig

CONFIG_JSON = "config.json"


def run_settings(run_dir: str) -> dict:
    """The TrainConfig fields a run was made with: RUN_DIR/config.json, else the checkpoint's metadata.
    Fields the run's version did not have yet take their defaults."""
    path = os.path.join(run_dir, CONFIG_JSON)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)["train"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: cannot read the run's settings ({err})") from None
    else:
        ckpt_path = os.path.join(run_dir, RUN_CHECKPOINT)
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no run to resume in {run_dir} (neither {CONFIG_JSON} nor "
                                    f"{RUN_CHECKPOINT})")
        from ..checkpoint import read_training_checkpoint
        saved = read_training_checkpoint(ckpt_path)[1]["state"]["train_config"]
    defaults = TrainConfig().to_dict()
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise ValueError(f"{run_dir} was made by a ddpm_fast with setting(s) {unknown} that this version lacks")
    return {**defaults, **saved}


def conflicts(saved: dict, changes: dict) -> list:
    """The fields of ``changes`` that differ from ``saved`` but may not change on resume."""
    return [k for k, v in changes.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]


def resume_config(run_dir: str, changes: Optional[dict] = None,
                  name: Callable[[str], str] = lambda field: field) -> TrainConfig:
    """The TrainConfig that resumes the run in ``run_dir``: its own settings with ``changes`` applied.

    name: how a field is called in error messages (the CLI passes field -> "--flag-name").
    Raises FileNotFoundError without a run, ValueError naming every conflicting change.
    """
    changes = {k: v for k, v in (changes or {}).items() if k not in ("out", "resume")}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"TrainConfig has no field(s) {unknown}")
    saved = run_settings(run_dir)
    bad = conflicts(saved, changes)
    if bad:
        allowed = ", ".join(name(k) for k in RESUMABLE_CHANGES if k not in ("out", "resume"))
        detail = "; ".join(f"{name(k)} {changes[k]!r} but the run has {saved.get(k)!r}" for k in bad)
        raise ValueError(f"resuming continues the run in {run_dir} with its own settings: {detail}. Drop "
                         f"{'that flag' if len(bad) == 1 else 'those flags'} (only {allowed} may change on "
                         f"resume), or start a new run with another {name('out')}")
    return TrainConfig(**{**saved, **changes, "out": run_dir, "resume": True})
