"""The manifest of a ``sample_to_dir`` run: everything that fixes its images, recorded in DIR/manifest.json, and
one digest of it that every chunk file carries.

What fixes the images is read from the RESOLVED call (``args.resolve``'s SampleJob: n, seed, the schedule's
identity, every field of the SamplePlan, and any other job field), not from a hand-picked list, so a new
``sample`` option is recorded as soon as ``resolve`` resolves it. The few job fields that cannot change the
images are named in ``NOT_FIXING``; a value this module cannot record (an unknown type) is an error, never
skipped. The model enters as a digest of its state_dict tensors (names, dtypes, shapes, bytes) and its configs:
the Python API is handed a model, not a file.

Not recorded (documented as outside the bitwise guarantee): the thread count and the GPU model, which change
the U-Net's rounding but not the noise; they are kept under "created" for the record.
"""
import dataclasses
import hashlib
import json
import os

import numpy as np
import torch

from .._version import __version__
from ..diffusion.schedule import NoiseSchedule
from ..files import atomic_write
from .args import as_unet

FORMAT = "ddpm_fast.sample_dir/1"
# SampleJob fields that do not fix the images: how the loop runs (graphs, progress; graph == eager bitwise), the
# call's position (start: each chunk sets its own), the model (its own digest) and the objects recorded through
# their parts (plan: field by field; schedule: by its key, in the plan).
NOT_FIXING = ("model", "generator", "cuda_graph", "graph", "progress", "start", "plan", "schedule")


def canonical(name, value):
    """A JSON-ready form of one resolved setting; tensors and arrays by their digest. Unknown types raise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return value.type  # cuda:0 and cuda:3 draw the same images; cpu and cuda round differently
    if isinstance(value, (tuple, list)):
        return [canonical(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(f"{name}.{k}", v) for k, v in sorted(value.items())}
    if isinstance(value, NoiseSchedule):
        return canonical(name, value.key)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tensor_digest(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(f"{name}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"sample_to_dir cannot record the setting {name}={value!r} ({type(value).__name__}) in its "
                    f"manifest; teach ddpm_fast.sampling.manifest.canonical this type")


def tensor_digest(t):
    """{"dtype", "shape", "sha256"} of a tensor's or array's values (C order, whatever its layout or device)."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}


def settings(job):
    """Everything of a resolved SampleJob that fixes its images, JSON-ready, with readable names."""
    out = {"n": job.n, "seed": job.seed, "steps": job.schedule.num_steps}
    for f in dataclasses.fields(job.plan):
        out[f.name] = canonical(f.name, getattr(job.plan, f.name))
    for f in dataclasses.fields(job):
        if f.name not in NOT_FIXING and f.name not in out:
            out[f.name] = canonical(f.name, getattr(job, f.name))
    return out


def model_fingerprint(model):
    """{"weights": sha256 of the state_dict, "config": the ddpm_fast configs or the class name}."""
    unet = as_unet(model)
    module = unet if unet is not None else model
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(json.dumps([name, canonical(name, value)], sort_keys=True).encode())
    if unet is not None:
        config = {"unet": unet.config.to_dict(),
                  "diffusion": None if unet.diffusion is None else unet.diffusion.to_dict()}
    else:
        config = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    return {"weights": h.hexdigest(), "config": json.loads(json.dumps(config, default=str))}


def build(job, model):
    """The manifest dict of a run: format, digest, settings, model, and (not compared) how it was created."""
    fixed = {"settings": settings(job), "model": model_fingerprint(model)}
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()
    created = {"ddpm_fast": __version__, "torch": torch.__version__, "threads": torch.get_num_threads()}
    return {"format": FORMAT, "digest": digest, **fixed, "created": created}


def differences(old, new, was="in the directory", now="now"):
    """Human-readable differences between two manifests' settings and models ([] when the digests agree);
    ``was`` / ``now`` name where each value comes from."""
    if old.get("digest") == new["digest"]:
        return []
    a, b = old.get("settings", {}), new["settings"]
    keys = list(b) + sorted(set(a) - set(b))  # n, seed, steps first: the settings users change
    changed = [k for k in keys if a.get(k, "(absent)") != b.get(k, "(absent)")]
    if "steps" in changed and "schedule_key" in changed:
        changed.remove("schedule_key")  # other steps are another respaced schedule: say it once
    diffs = [f"{k}: {_short(a.get(k, '(absent)'))} {was}, {_short(b.get(k, '(absent)'))} {now}" for k in changed]
    old_model = old.get("model", {})
    if old_model.get("config") != new["model"]["config"]:
        diffs.append("the model's config differs (another architecture or training config)")
    elif old_model.get("weights") != new["model"]["weights"]:
        diffs.append("the model's weights differ (another checkpoint)")
    return diffs or ["the manifest's digest differs"]


def _short(value):
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def path_in(directory):
    return os.path.join(directory, "manifest.json")


def write(directory, manifest):
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    def put(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path_in(directory), put)


def read(directory):
    """The manifest in ``directory``, or None when there is none; a file that is not one raises ValueError."""
    path = path_in(directory)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable ddpm_fast sample manifest ({err}); remove it or pass "
                         f"overwrite=True (--overwrite) to start over") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "digest" not in manifest:
        raise ValueError(f"{path} is not a ddpm_fast sample manifest (format {FORMAT}); remove it or pass "
                         f"overwrite=True (--overwrite) to start over")
    return manifest
