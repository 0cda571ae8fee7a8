"""ddpm_fast.sample_to_dir: an evaluation-scale run (say 50,000 images) over one process or many (torchrun),
resumable chunk by chunk, ending in the standard uint8 NHWC ``samples.npz``.

The n images are split into chunks of the batch size B; chunk k holds images k*B .. k*B+b-1 and is drawn by
``sample(model, b, start=k*B, batch_size=B, seed=...)``, so its images are exactly those of one unsharded
``sample(model, n, batch_size=B, seed=...)`` on the same device and thread count, whoever draws it. Every chunk
call has the same batch size and settings, so a CUDA run replays cached graphs rather than capturing per chunk.

Under torchrun (WORLD_SIZE > 1) every rank joins the process group (NCCL on GPUs, gloo on the CPU; the model must
be on cuda:LOCAL_RANK), rank 0 checks the directory against the manifest and lists the chunks still missing, and
rank r draws missing chunks r, r + world, r + 2 world, ... (a static assignment: equal GPUs finish together).
Each finished chunk is its own file (chunkfiles.py); when all exist, rank 0 streams them into DIR/samples.npz
(and one PNG per image into png_dir). A rerun skips every usable chunk file; other settings are refused.
With ``labels=`` (a class-conditional model) each chunk call gets its rows of the labels, the manifest records the
labels and the guidance scale, and samples.npz holds the labels as "arr_1" (guided-diffusion's convention).
"""
import builtins
import contextlib
import datetime
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import distributed
from ..images import png_name, to_uint8
from . import chunkfiles, manifest
from .args import _check_int, _model_tensor, resolve
from .sample import sample

log = logging.getLogger("ddpm_fast")

GROUP_TIMEOUT = datetime.timedelta(hours=6)  # the final barrier waits for the slowest rank's last chunk
FAULT_ENV = "DDPM_FAST_TEST_FAULT"
_NOT_SAMPLE_ARGS = {"start": "sample_to_dir draws images 0..n-1 itself and sets each chunk's start",
                    "generator": "generator= noise has no element offsets; chunks need seed= (or seed=None)",
                    "progress": "progress= is sample_to_dir's own argument (one bar for the whole run)",
                    "x_T": "every chunk's starting noise comes from the seed (and its images' indices)"}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".npy")


@dataclass
class DirRun:
    """What a ``sample_to_dir`` call did. rank_images / rank_seconds: images each rank drew and its drawing time."""
    path: str
    png_dir: Optional[str]
    n: int
    world_size: int
    drawn: int
    reused: int
    wall_s: float
    rank_images: List[int] = field(default_factory=list)
    rank_seconds: List[float] = field(default_factory=list)
    removed: List[Tuple[str, str]] = field(default_factory=list)

    def summary(self):
        """One line: images, wall time, images/s in total (images drawn / the slowest rank's drawing time) and
        per rank."""
        rate = self.drawn / max(self.rank_seconds) if self.drawn and max(self.rank_seconds) > 0 else 0.0
        per = ", ".join(f"rank {r}: {i / s:.2f}" if i and s > 0 else f"rank {r}: -"
                        for r, (i, s) in enumerate(zip(self.rank_images, self.rank_seconds)))
        return (f"{self.n} images in {self.path} ({self.drawn} drawn now, {self.reused} found on disk) in "
                f"{self.wall_s:.1f} s; {rate:.2f} images/s drawn by {self.world_size} process(es) ({per} "
                f"images/s)")


def sample_to_dir(model, n, out_dir, *, png_dir=None, overwrite=False, progress=True, **sample_args):
    """Draws ``n`` images into ``out_dir``, resumably, over every process torchrun started; returns a DirRun.

    The result is ``out_dir/samples.npz`` with "arr_0": uint8 (n, H, W, C) (and with ``labels``, "arr_1": the
    (n,) int64 class labels), image i equal to image i of
    ``sample(model, n, batch_size=B, seed=S, ...)`` converted by ``images.to_uint8``, bitwise on the same device
    and thread count (B: the resolved batch size; S: the seed, drawn from torch's RNG when None, or the seed of
    the run already in out_dir). Beside it: manifest.json (every setting that fixes the images, the model's
    digest) and chunks/ (one file per chunk). A rerun of the same call draws only the missing chunks; a call with
    other settings is refused naming the difference, unless ``overwrite`` (then the run starts over).

    :param model: a ``torch.nn.Module`` (a ddpm_fast UNet, or any model ``sample`` accepts), on cuda:LOCAL_RANK
        under torchrun with CUDA.
    :param png_dir: also write one PNG per image there (000000.png ...), for folder-based FID tools; it must not
        hold other images. C must be 1, 3 or 4.
    :param progress: one bar (rank 0) over the images of all ranks.
    :param sample_args: ``sample``'s keyword arguments (steps, sampler, eta, seed, batch_size, dtype, labels,
        guidance_scale, ...), not start / generator / x_T / progress.
    """
    t0 = time.perf_counter()
    out_dir, png_dir = _check_call(model, n, out_dir, png_dir, overwrite, progress, sample_args)
    with _process_group(model) as info:
        job, record = _resolve_run(model, n, out_dir, overwrite, sample_args, info)
        todo, removed = _on_main(info, lambda: _prepare(out_dir, record, job, overwrite))
        if info.is_main:
            for name, why in removed:
                log.warning("sample_to_dir: removed %s: %s", name, why)
        t_draw = time.perf_counter()
        drawn = _draw(model, job, sample_args, record["digest"], out_dir, todo, info, progress)
        seconds = time.perf_counter() - t_draw
        distributed.barrier(info)
        path = _on_main(info, lambda: chunkfiles.assemble(out_dir, record["digest"], job.chunks, job.plan.shape,
                                                          png_dir, labels=job.labels))
        stats = distributed.gather_objects((drawn, seconds), info)
    missing = set(todo)
    reused = n - sum(b for k, (_, b) in enumerate(job.chunks) if k in missing)
    return DirRun(path, png_dir, n, info.world_size, sum(s[0] for s in stats), reused, time.perf_counter() - t0,
                  [s[0] for s in stats], [s[1] for s in stats], removed)


# ---- checks before any work --------------------------------------------------------------------------------

def _check_call(model, n, out_dir, png_dir, overwrite, progress, sample_args):
    """Every argument checked on every rank before any collective or file is touched -> (out_dir, png_dir)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sample_to_dir needs a torch.nn.Module (its state_dict goes into the manifest), got "
                        f"{type(model).__name__}")
    n = _check_int("n", n, 1)
    for key, why in _NOT_SAMPLE_ARGS.items():
        if key in sample_args:
            raise ValueError(f"{key}= is not a sample_to_dir argument: {why}")
    for name, value in (("overwrite", overwrite), ("progress", progress)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    seed = sample_args.get("seed")
    job = resolve(model, n, **{**sample_args, "seed": 0 if seed is None else seed, "progress": False})
    if png_dir is not None and job.plan.shape[0] not in (1, 3, 4):
        raise ValueError(f"png_dir: a PNG holds 1, 3 or 4 channels, the images have {job.plan.shape[0]}")
    out_dir = _dir_path("out_dir", out_dir)
    png_dir = None if png_dir is None else _dir_path("png_dir", png_dir)
    if png_dir is not None and os.path.isdir(png_dir):
        _check_png_dir(png_dir, n)
    for name, path in (("out_dir", out_dir), ("png_dir", png_dir)):
        if path is not None:
            _make_writable_dir(name, path)
    return out_dir, png_dir


def _dir_path(name, path):
    """The absolute path of a directory to write into: not a file (it may not exist yet)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{name} must be a directory path, got {path!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path} is a file, not a directory")
    return path


def _make_writable_dir(name, path):
    """Creates the directory if need be and checks that it takes new files by making one (os.access answers yes
    to root where the kernel still refuses writes, e.g. in sysfs)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp_probe_")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{name} {path} is not a writable directory: {err.strerror or err}") from None


def _check_png_dir(png_dir, n):
    """Folder-based FID tools read every image in a folder: refuse one holding images this run does not write."""
    others = sorted(f for f in os.listdir(png_dir) if f.lower().endswith(_IMAGE_EXTENSIONS) and not (
        f[:-4].isdigit() and int(f[:-4]) < n and f == png_name(int(f[:-4]), n)) and not chunkfiles.is_temp_png(f))
    if others:
        raise ValueError(f"png_dir {png_dir} holds {len(others)} image(s) this run does not write (e.g. "
                         f"{others[0]}): FID tools would count them; give an empty or new directory")


# ---- processes ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _process_group(model):
    """The torchrun process group (joined here and left at the end, or the caller's), or a lone process."""
    own = _model_tensor(model)
    dev = own.device if own is not None else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        yield distributed.DistInfo(dist.get_rank(), dist.get_world_size(), distributed.torchrun_env()[2], dev)
        return
    rank, world, local_rank = distributed.torchrun_env()
    if world <= 1:
        yield distributed.DistInfo(0, 1, 0, dev)
        return
    if dev.type == "cuda" and dev.index != local_rank:
        raise ValueError(f"under torchrun, rank {rank} samples on cuda:{local_rank} (LOCAL_RANK={local_rank}) but "
                         f"the model is on {dev}: move it there first (model.to('cuda:{local_rank}'))")
    info = distributed.setup(str(dev), timeout=GROUP_TIMEOUT)
    try:
        yield info
    finally:
        distributed.cleanup()


def _on_main(info, fn):
    """fn() run by rank 0 alone; its result, or its exception, on every rank (so no rank waits forever)."""
    if not info.distributed:
        return fn()
    outcome = None
    if info.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as err:  # noqa: BLE001 -- re-raised here and, by type and message, on every other rank
            distributed.broadcast_object(("error", type(err).__name__, str(err)), info)
            raise
    outcome = distributed.broadcast_object(outcome, info)
    if outcome[0] == "error":
        kind = getattr(builtins, outcome[1], None)
        raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(outcome[2])
    return outcome[1]


def _resolve_run(model, n, out_dir, overwrite, sample_args, info):
    """The resolved job (one seed for all ranks) and its manifest; every rank must resolve the same one."""
    seed = sample_args.get("seed")
    if seed is None:  # the run already in out_dir keeps its seed, so the same call resumes it
        def pick():
            old = None if overwrite else manifest.read(out_dir)
            return old["settings"]["seed"] if old else int(torch.randint(0, 2 ** 62, (1,)).item())
        seed = _on_main(info, pick)
    job = resolve(model, n, **{**sample_args, "seed": seed, "progress": False})
    record = manifest.build(job, model)
    others = distributed.gather_objects(record, info)
    for rank, other in enumerate(others):
        diffs = manifest.differences(others[0], other, "on rank 0", f"on rank {rank}")
        if diffs:
            raise ValueError(f"rank {rank} would draw other images than rank 0 ({'; '.join(diffs)}): every rank "
                             f"must load the same model with the same settings")
    return job, record


def _prepare(out_dir, record, job, overwrite):
    """Rank 0: refuses a directory holding another run (unless overwrite), writes the manifest, removes unusable
    chunk files -> (indices of the chunks still to draw, [(removed file, why)])."""
    old = manifest.read(out_dir) if not overwrite else None
    if overwrite:
        chunkfiles.remove_run_files(out_dir)
    if old is not None:
        diffs = manifest.differences(old, record)
        if diffs:
            raise ValueError(f"{out_dir} holds a run with other settings: {'; '.join(diffs)}. Run with the same "
                             f"settings to resume it, or with overwrite=True (--overwrite) to start over")
    else:
        manifest.write(out_dir, record)
    C, H, W = job.plan.shape
    done, removed = chunkfiles.scan(out_dir, record["digest"], [(b, H, W, C) for _, b in job.chunks])
    return [k for k in range(len(job.chunks)) if k not in done], removed


# ---- drawing ------------------------------------------------------------------------------------------------

def _draw(model, job, sample_args, digest, out_dir, todo, info, progress):
    """This rank's share of the missing chunks, each drawn and written as its own file -> images drawn."""
    from tqdm.auto import tqdm
    chunks, folder = job.chunks, os.path.join(out_dir, chunkfiles.SUBDIR)
    missing = sum(chunks[k][1] for k in todo)
    drawn = 0
    with tqdm(total=job.n, initial=job.n - missing, disable=not (progress and info.is_main), unit="img",
              desc="ddpm_fast.sample_to_dir", dynamic_ncols=True) as bar:
        for k in todo[info.rank::info.world_size]:
            start, b = chunks[k]
            pixels = _draw_chunk(model, job, sample_args, k, start, b)
            path = os.path.join(folder, chunkfiles.chunk_name(k, len(chunks)))
            chunkfiles.write_chunk(path, pixels, digest, k, start,
                                   before_rename=lambda tmp, k=k: _fault("kill-mid-write", info.rank, k))
            _fault("kill-after", info.rank, k)
            _fault("interrupt", info.rank, k)
            drawn += b
            if info.is_main:  # every rank's finished chunks: the files on disk
                bar.update(_images_on_disk(folder, chunks) - bar.n)
    return drawn


def _draw_chunk(model, job, sample_args, k, start, b):
    """Chunk k: images start..start+b-1 of the run (with their rows of the run's labels), as uint8 (b, H, W, C)."""
    kw = {**sample_args, "seed": job.seed, "batch_size": job.plan.batch, "start": start, "progress": False}
    if job.labels is not None:
        kw.update(labels=job.labels[start:start + b], guidance_scale=job.guidance_scale)
    try:
        x = sample(model, b, **kw)
    except FloatingPointError as err:
        raise FloatingPointError(f"chunk {k} (images {start}..{start + b - 1}): {err}") from None
    return to_uint8(x)


def _images_on_disk(folder, chunks):
    names = set(os.listdir(folder))
    return sum(b for k, (_, b) in enumerate(chunks) if chunkfiles.chunk_name(k, len(chunks)) in names)


def _fault(action, rank, k):
    """TEST-ONLY fault injection for the crash-and-resume tests; never set DDPM_FAST_TEST_FAULT otherwise.

    DDPM_FAST_TEST_FAULT="RANK:CHUNK:ACTION" stops rank RANK at chunk CHUNK, deterministically:
    "kill-mid-write": SIGKILL to itself once the chunk's temp file is complete, before it is renamed into place;
    "kill-after": SIGKILL to itself right after the chunk file is in place;
    "interrupt": after the chunk file is in place, SIGINT to torchrun (which passes it to every rank, as after
        Ctrl-C in a terminal), or to itself when it runs alone.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_rank, want_chunk, want = spec.split(":")
    if want != action or int(want_rank) != rank or int(want_chunk) != k:
        return
    if action == "interrupt":
        os.kill(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid(), signal.SIGINT)
        time.sleep(60)  # the SIGINT arrives here as KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGKILL)
