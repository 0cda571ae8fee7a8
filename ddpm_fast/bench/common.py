"""What every ddpm_fast benchmark needs: interleaved timing with spread, the machine's description, its measured
matmul rate (the ceiling for achieved FLOP/s), U-Net FLOPs, atomic JSON and Markdown tables.

Timing rules (nanoGPT's bench.py and triton.testing in spirit): each variant's first call is timed apart (it
compiles / captures), then ``warmup`` untimed calls, then ``repeats`` rounds in which every variant runs once,
the order rotated each round so no variant always follows the same neighbour. CUDA calls are timed with CUDA
events after a synchronize; the peak allocated memory of each call is recorded.
"""
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..files import atomic_write


@dataclass
class Timed:
    """One variant's measurements: seconds per call, the first call apart; CUDA peak/resident memory in bytes."""
    name: str
    first_call_s: Optional[float] = None
    times_s: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    resident_bytes: Optional[int] = None
    error: Optional[str] = None

    def stats(self) -> dict:
        """median, min, max, q1, q3 of the timed calls (seconds)."""
        ts = sorted(self.times_s)
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
        return {"median": statistics.median(ts), "min": ts[0], "max": ts[-1], "q1": q1, "q3": q3}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device, timed: Timed) -> float:
    """Runs fn once; returns its seconds (CUDA events on a GPU) and updates timed's memory peaks."""
    cuda = torch.device(device).type == "cuda"
    _sync(device)
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    timed.peak_bytes = max(timed.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
    timed.resident_bytes = max(timed.resident_bytes or 0, resident)
    return start.elapsed_time(end) / 1e3


def time_interleaved(variants: Dict[str, Callable[[], object]], device, repeats: int = 5, warmup: int = 1,
                     log: Optional[Callable[[str], None]] = None) -> Dict[str, Timed]:
    """name -> Timed. A variant that raises is recorded with its error and dropped; the others go on."""
    results = {name: Timed(name) for name in variants}

    def guarded(name, fn):
        try:
            return _timed_call(fn, device, results[name])
        except Exception as err:  # noqa: BLE001 -- a failing variant must not stop the others
            results[name].error = f"{type(err).__name__}: {err}"
            if log:
                log(f"  {name} FAILED: {results[name].error}")
            _sync_quietly(device)
            return None

    for name, fn in variants.items():
        results[name].first_call_s = guarded(name, fn)
        for _ in range(warmup):
            if results[name].error is None:
                guarded(name, fn)
        if log and results[name].error is None:
            log(f"  {name}: first call {results[name].first_call_s:.2f} s")
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if results[name].error is None:
                seconds = guarded(name, variants[name])
                if seconds is not None:
                    results[name].times_s.append(seconds)
    return results


def time_bursts(variants: Dict[str, Callable[[], object]], repeats: int, burst: int, device,
                warmup: int = 3) -> Dict[str, List[float]]:
    """name -> seconds per call in each repeat: for microsecond-scale ops, each repeat times ``burst`` calls of
    every variant in turn (the variants alternate within every repeat), after ``warmup`` untimed calls each."""
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: kernel compilation, allocator, caches
        for _ in range(warmup):
            fn()
    _sync(device)
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / burst)
    return times


def _sync_quietly(device):
    try:
        _sync(device)
    except Exception:  # noqa: BLE001 -- the error was recorded; a sticky CUDA error will show in later calls
        pass


# ---- the machine ------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def device_name(device) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git_head(directory: str) -> Optional[str]:
    """HEAD of the git checkout holding ``directory``, with '+dirty' when tracked files outside
    benchmarks/results/ differ from it (results written by earlier runs do not count); None outside a checkout."""
    try:
        root = subprocess.run(["git", "-C", directory, "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit_and_source():
    """(commit, where it came from): DDPM_FAST_GIT_COMMIT when set (a machine without .git, e.g. the GPU suite's,
    is told it; '+dirty' at its end marks uncommitted changes); else the git checkout the imported package lives
    in (working from the sources); else the checkout of the working directory, for a package installed from it
    (CI installs the checkout it runs in; the source then names the installed package's path); else (None, None)."""
    if os.environ.get("DDPM_FAST_GIT_COMMIT"):
        return os.environ["DDPM_FAST_GIT_COMMIT"], "DDPM_FAST_GIT_COMMIT"
    commit = _git_head(_repo_root())
    if commit is not None:
        return commit, "git: the package's source tree"
    commit = _git_head(os.getcwd())
    if commit is not None:
        return commit, f"git: the working directory's checkout (package imported from {_repo_root()})"
    return None, None


def git_commit() -> Optional[str]:
    """The commit measured (see ``git_commit_and_source``), None when it cannot be told."""
    return git_commit_and_source()[0]


def provenance(allow_dirty: bool = False, who: str = "benchmark") -> dict:
    """{"git_commit", "dirty", "allow_dirty"} of the code about to be measured. Refuses (SystemExit, before any
    work) a tree with uncommitted changes unless ``allow_dirty`` (then the JSON says so), and code whose commit
    cannot be told (no git and no DDPM_FAST_GIT_COMMIT): a number must name the code it measured."""
    commit, source = git_commit_and_source()
    if commit is None:
        raise SystemExit(f"{who}: cannot tell which commit is measured (no git repository here); set "
                         f"DDPM_FAST_GIT_COMMIT=<sha> (benchmarks/gpu_suite.sh takes it as its second argument)")
    dirty = commit.endswith("+dirty")
    if dirty and not allow_dirty:
        raise SystemExit(f"{who}: the working tree has uncommitted changes ({commit}); commit them, or pass "
                         f"--allow-dirty to measure anyway (the results then record dirty: true)")
    return {"git_commit": commit, "dirty": dirty, "allow_dirty": bool(allow_dirty), "commit_source": source}


def environment(device, source: Optional[dict] = None) -> dict:
    """Device, versions, date, commit, threads and load: the conditions a reader needs beside any number.
    ``source``: what ``provenance`` returned (checked before the run started); looked up here when None."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .._version import __version__
    from ..ops import _ext
    from ..ops import device as _device
    dev = torch.device(device)
    env = {"device": device_name(dev), "device_type": dev.type, "cpu": cpu_model(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           **(source or provenance(allow_dirty=True)), "ddpm_fast": __version__, "torch": torch.__version__,
           "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "extension": _ext.load() is not None, "extension_cuda": _ext.has_cuda_kernels(),
           "extension_cuda_usable": dev.type == "cuda" and _device.cuda_kernels_usable(dev),
           "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}")
    return env


def bench_device(device: str, threads: Optional[int], who: str) -> torch.device:
    """The torch.device a benchmark runs on, after checking CUDA exists when asked for; sets torch's CPU thread
    count when ``threads`` is given. ``who`` names the command in the error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{who}: --device cuda but CUDA is not available")
    if threads:
        torch.set_num_threads(threads)
    return torch.device(device)


def matmul_tflops(device, dtype=None, size: Optional[int] = None, repeats: int = 5) -> dict:
    """The measured dense matmul rate: (size x size) @ (size x size) in ``dtype`` (default: bf16 on a GPU, fp32
    elsewhere), median of repeats. The ceiling for achieved U-Net FLOP/s (convolutions are matmuls underneath)."""
    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    size = size or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b, c = torch.randn_like(a), torch.empty_like(a)
    burst = 10 if dev.type == "cuda" else 1

    def run():
        for _ in range(burst):
            torch.mm(a, b, out=c)

    t = time_interleaved({"mm": run}, dev, repeats=repeats, warmup=1)["mm"]
    if t.error:
        raise RuntimeError(f"matmul benchmark failed: {t.error}")
    seconds = t.stats()["median"] / burst
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * size ** 3 / seconds / 1e12}


def unet_gflops(config) -> float:
    """GFLOP of one U-Net forward of ONE image (2 per multiply-add; convolutions, linears and attention
    matmuls as torch.utils.flop_counter counts them), counted on the meta device: no memory, no compute."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from ..models import UNet
    cfg = dataclasses.replace(config, fused=False)  # the custom op has no FLOP formula; the math is the same
    with torch.device("meta"):
        model = UNet(cfg).eval()
        x = torch.empty(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(1, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() / 1e9


# ---- output -----------------------------------------------------------------------------------------------

def write_json_atomic(path: str, payload) -> str:
    """Writes ``payload`` as indented JSON to ``path`` atomically; returns path."""
    text = json.dumps(payload, indent=1, default=str)
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))
    return path


def result_path(out_dir: str, prefix: str, device, quick: bool, suffix=".json") -> str:
    """<out_dir>/<prefix><device slug>-<YYYY-MM-DD>[-quick].json"""
    date = datetime.date.today().isoformat()
    return os.path.join(out_dir, f"{prefix}{slug(device_name(device))}-{date}{'-quick' if quick else ''}{suffix}")


def markdown_table(rows: List[dict], columns: List[tuple]) -> str:
    """columns: (header, key, format spec or callable). Missing values print as '-'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif callable(fmt):
                cells.append(fmt(value, row))
            else:
                cells.append(format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
