"""`ddpm-fast bench`: how fast ddpm_fast.sample draws images, against what a user
would otherwise run, with the same U-Net weights, steps and batch, measured side by side in one process.

Variants (each a full sampling call of ``batch`` images x ``steps`` steps):
    eager                  the plain baseline: U-Net with fused=False, eager, a Python loop of separate torch ops
                           with torch.randn per step (ddpm_fast/bench/baseline.py)
    eager-cl               the same with the U-Net's weights and input in channels_last (ddpm_fast's CPU layout)
    eager+diffusers-step   the same loop with diffusers' DDPMScheduler.step as the posterior math
    diffusers              diffusers' DDPMPipeline: UNet2DModel + DDPMScheduler with the converted weights
    compile, compile-ro    the baseline with torch.compile(unet) (mode default / "reduce-overhead", which on a GPU
                           adds CUDA graphs); the first call's compile time is reported apart
    compile-cl             torch.compile(unet) on channels_last weights and input
    compile-step, compile-step-ro   torch.compile of the WHOLE step (U-Net + posterior update + torch.randn, the
                           per-step timestep and index passed as tensors, so nothing recompiles per step), mode
                           default / "reduce-overhead" (GPU only: it adds CUDA graphs): the best a user can do
                           with torch.compile
    compile-step-cl        the whole step compiled, channels_last weights and input
    ddpm_fast              ddpm_fast.sample (CPU: the fused eager path)
    ddpm_fast-compile      ddpm_fast.sample(compile=True): the U-Net (its channels_last twin on the CPU) compiled
                           by torch.compile, ddpm_fast's fused step; the first call's compile time is reported apart
    ddpm_fast-whole, ddpm_fast-step, ddpm_fast-eager   (GPU) the whole loop as one CUDA graph / one step's graph
                           replayed / no graph
    ddpm_fast-whole-compile   (GPU) compile=True inside the whole-loop CUDA graph
With ``--sampler`` other than ddpm (ddim or a few-step solver) every variant uses that sampler: the baselines
(eager, compile, diffusers) step with diffusers' scheduler of that sampler (DDIMScheduler,
DPMSolverMultistepScheduler, UniPCMultistepScheduler) on its own default grid of ``steps`` steps, ddpm_fast with
``spacing``: the same number of model evaluations either way.
The configuration is a dataclass (BenchConfig); the command line is derived from it. This module imports only
the standard library, so `ddpm-fast --help` stays fast; the measuring lives in bench/sampling.py.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

VARIANTS = {
    "eager": "plain U-Net (fused=False), eager loop, torch ops + torch.randn per step",
    "eager-cl": "plain U-Net, eager loop, channels_last weights and input",
    "eager+diffusers-step": "plain U-Net, eager loop, diffusers DDPMScheduler.step",
    "diffusers": "diffusers DDPMPipeline (UNet2DModel + DDPMScheduler), same weights",
    "compile": "plain loop, torch.compile(unet) default mode",
    "compile-ro": "plain loop, torch.compile(unet, mode='reduce-overhead')",
    "compile-cl": "plain loop, torch.compile(unet) on channels_last weights and input",
    "compile-step": "torch.compile of the whole step (U-Net + update + randn), default mode",
    "compile-step-ro": "torch.compile of the whole step, mode='reduce-overhead' (CUDA graphs; GPU only)",
    "compile-step-cl": "torch.compile of the whole step, channels_last weights and input",
    "ddpm_fast": "ddpm_fast.sample (fused U-Net and step)",
    "ddpm_fast-compile": "ddpm_fast.sample(compile=True): compiled U-Net, fused step",
    "ddpm_fast-whole": "ddpm_fast.sample, whole reverse loop in one CUDA graph",
    "ddpm_fast-step": "ddpm_fast.sample, one step's CUDA graph replayed",
    "ddpm_fast-eager": "ddpm_fast.sample, cuda_graph=False",
    "ddpm_fast-whole-compile": "ddpm_fast.sample(compile=True), the compiled U-Net inside the whole-loop graph",
}
CPU_VARIANTS = ("eager", "eager-cl", "eager+diffusers-step", "diffusers", "compile", "compile-ro", "compile-cl",
                "compile-step", "compile-step-cl", "ddpm_fast", "ddpm_fast-compile")
GPU_VARIANTS = ("eager", "eager-cl", "eager+diffusers-step", "diffusers", "compile", "compile-ro", "compile-cl",
                "compile-step", "compile-step-ro", "compile-step-cl", "ddpm_fast-whole", "ddpm_fast-step",
                "ddpm_fast-eager", "ddpm_fast-whole-compile")
COMPILE_VARIANTS = ("compile", "compile-ro", "compile-cl", "compile-step", "compile-step-ro", "compile-step-cl")
FAST_COMPILE_VARIANTS = ("ddpm_fast-compile", "ddpm_fast-whole-compile")  # ddpm_fast + torch.compile
CPU_ONLY, GPU_ONLY = ("ddpm_fast", "ddpm_fast-compile"), ("ddpm_fast-whole", "ddpm_fast-step", "ddpm_fast-eager",
                                                          "ddpm_fast-whole-compile")
REDUCE_OVERHEAD = ("compile-ro", "compile-step-ro")  # add CUDA graphs: nothing on the CPU
# What a user could run instead of ddpm_fast: each row's "vs best plain" divides the fastest of these
PLAIN_VARIANTS = ("eager", "eager-cl", "eager+diffusers-step", "diffusers", *COMPILE_VARIANTS)
PRESETS = ("tiny", "ddpm_cifar10")
DTYPES = ("fp32", "bf16", "fp16")
# Defaults per device. CPU: the CIFAR U-Net costs ~0.3-5 s per forward on 2 cores, so only batch 1 there.
DEFAULT_BATCHES = {"cpu": {"tiny": (1, 16), "ddpm_cifar10": (1,)},
                   "cuda": {"tiny": (1, 16, 128, 512), "ddpm_cifar10": (1, 16, 128, 512)}}
DEFAULT_STEPS = {"cpu": (20,), "cuda": (100, 1000)}
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("fp32", "bf16")}
BENCH_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")  # = diffusion.SAMPLERS
BENCH_SPACINGS = ("linspace", "leading", "trailing", "logsnr")                   # = diffusion SPACINGS


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class BenchConfig:
    """One benchmark run: the cross product presets x dtypes x batches x steps, every variant per case.
    None fields take the device's defaults (``resolved()``)."""
    device: str = _f("cpu", "cpu | cuda", choices=("cpu", "cuda"))
    presets: Optional[Tuple[str, ...]] = _f(None, "U-Net presets (default tiny,ddpm_cifar10)", kind="list")
    batches: Optional[Tuple[int, ...]] = _f(None, "batch sizes (default CPU: tiny 1,16, ddpm_cifar10 1; "
                                            "GPU: 1,16,128,512)", kind="ints")
    steps: Optional[Tuple[int, ...]] = _f(None, "sampling steps (default CPU 20; GPU 100,1000)", kind="ints")
    dtypes: Optional[Tuple[str, ...]] = _f(None, "model dtypes fp32,bf16,fp16 (default CPU fp32; GPU fp32,bf16)",
                                           kind="list")
    variants: Optional[Tuple[str, ...]] = _f(None, f"variants to run (default: all for the device): "
                                             f"{', '.join(VARIANTS)}", kind="list")
    compile: str = _f("auto", "torch.compile variants (the baselines and ddpm_fast-compile): auto (GPU: every "
                      "compile variant everywhere; CPU: the default-mode ones on the tiny preset only, since "
                      "compiling the CIFAR U-Net takes minutes there and reduce-overhead only adds CUDA graphs), "
                      "all, none",
                      choices=("auto", "all", "none"))
    compile_batches: Optional[Tuple[int, ...]] = _f(None, "batch sizes that get compile variants (default all)",
                                                    kind="ints")
    compile_where: Optional[Tuple[str, ...]] = _f(None, "variant:dtype:batch triples: compile variants run ONLY "
                                                  "there (each compile costs tens of seconds; e.g. "
                                                  "compile-step-ro:bf16:1,compile-step:bf16:128)", kind="list")
    repeats: int = _f(5, "timed rounds (median and spread over them)")
    warmup: int = _f(1, "untimed calls per variant after the (separately timed) first call")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's)")
    out_dir: str = _f("benchmarks/results", "directory of the JSON results (<device>-<date>.json)")
    profile: Optional[Tuple[str, ...]] = _f(None, "variants to profile once per case (torch.profiler table)",
                                            kind="list")
    cases: Optional[Tuple[str, ...]] = _f(None, "explicit cases preset:dtype:batch:steps, run in this order "
                                          "(instead of the presets x dtypes x steps x batches product)", kind="list")
    time_budget: Optional[float] = _f(None, "seconds: cases not started by then are skipped (listed in the JSON)")
    quick: bool = _f(False, "dry run: tiny preset, batches 1,2, 3 steps, 2 repeats (results file *-quick.json)")
    seed: int = _f(0, "seed of the model weights and of ddpm_fast.sample")
    sampler: str = _f("ddpm", "the sampler of every variant (baselines: diffusers' scheduler of it)",
                      choices=BENCH_SAMPLERS)
    spacing: Optional[str] = _f(None, "ddpm_fast's timestep spacing (default: the sampler's)", choices=BENCH_SPACINGS)
    allow_dirty: bool = _f(False, "measure a working tree with uncommitted changes (the JSON records dirty: true)")

    def resolved(self) -> "BenchConfig":
        """A copy with the device's defaults filled in and every value checked (ValueError names the field)."""
        c = dataclasses.replace(self)
        dev = c.device
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"BenchConfig.device={dev!r}: choose cpu or cuda")
        if c.quick:
            c.presets = c.presets or ("tiny",)
            c.batches, c.steps = c.batches or (1, 2), c.steps or (3,)
            c.repeats, c.warmup = min(c.repeats, 2), 0
            c.compile = "none" if c.compile == "auto" and dev == "cpu" else c.compile
        c.presets = tuple(c.presets or PRESETS)
        c.steps = tuple(c.steps or DEFAULT_STEPS[dev])
        c.dtypes = tuple(c.dtypes or (("fp32", "bf16") if c.quick and dev == "cuda" else DEFAULT_DTYPES[dev]))
        c.variants = tuple(c.variants or (GPU_VARIANTS if dev == "cuda" else CPU_VARIANTS))
        c.profile = tuple(c.profile or ())
        c._check()
        return c

    def _check(self):
        def bad(name, why):
            raise ValueError(f"BenchConfig.{name}={getattr(self, name)!r}: {why}")

        for name, allowed in (("presets", PRESETS), ("dtypes", DTYPES), ("variants", tuple(VARIANTS)),
                              ("profile", tuple(VARIANTS))):
            unknown = [v for v in getattr(self, name) if v not in allowed]
            if unknown:
                bad(name, f"unknown {unknown}; choose from {', '.join(allowed)}")
        for spec in self.compile_where or ():
            parts = spec.split(":")
            if len(parts) != 3 or parts[0] not in COMPILE_VARIANTS + FAST_COMPILE_VARIANTS or \
                    parts[1] not in DTYPES or \
                    not (parts[2].isdigit() and int(parts[2]) > 0):
                bad("compile_where", f"{spec!r} is not compile-variant:dtype:batch (e.g. compile-step:bf16:128)")
        for spec in self.cases or ():
            parts = spec.split(":")
            if len(parts) != 4 or parts[0] not in PRESETS or parts[1] not in DTYPES or \
                    not all(p.isdigit() and int(p) > 0 for p in parts[2:]):
                bad("cases", f"{spec!r} is not preset:dtype:batch:steps (e.g. ddpm_cifar10:bf16:128:100)")
        for name in ("batches", "steps", "compile_batches"):
            if getattr(self, name) is not None and any(v < 1 for v in getattr(self, name)):
                bad(name, "must be positive")
        if self.repeats < 1 or self.warmup < 0:
            bad("repeats", "repeats must be >= 1 and warmup >= 0")
        if self.device == "cpu" and any(v in GPU_ONLY for v in self.variants):
            bad("variants", "ddpm_fast-whole/-step/-eager/-whole-compile are GPU variants; on the CPU use "
                "ddpm_fast or ddpm_fast-compile")
        if self.device == "cuda" and any(v in CPU_ONLY for v in self.variants):
            bad("variants", "on a GPU choose ddpm_fast-whole, ddpm_fast-step, ddpm_fast-eager or "
                "ddpm_fast-whole-compile")
        if self.threads is not None and self.threads < 1:
            bad("threads", "must be >= 1")
        if self.sampler not in BENCH_SAMPLERS:
            bad("sampler", f"choose from {', '.join(BENCH_SAMPLERS)}")
        if self.spacing is not None and self.spacing not in BENCH_SPACINGS:
            bad("spacing", f"choose from {', '.join(BENCH_SPACINGS)}")

    def batches_for(self, preset):
        return self.batches or DEFAULT_BATCHES[self.device][preset]

    def all_cases(self):
        """(preset, dtype, batch, steps) in run order: cheap presets first, so a cut-short run has them."""
        if self.cases:
            return [(p, d, int(b), int(s)) for p, d, b, s in (spec.split(":") for spec in self.cases)]
        return [(p, d, b, s) for p in self.presets for d in self.dtypes for s in self.steps
                for b in self.batches_for(p)]

    def variants_for(self, preset, batch, dtype=None):
        """The variants of one case, after the compile policy."""
        out = []
        for v in self.variants:
            if v in COMPILE_VARIANTS + FAST_COMPILE_VARIANTS:
                if self.compile == "none" or (self.compile_batches and batch not in self.compile_batches):
                    continue
                if self.compile_where is not None and f"{v}:{dtype}:{batch}" not in self.compile_where:
                    continue
                if self.compile == "auto" and self.device == "cpu" and (preset != "tiny" or v in REDUCE_OVERHEAD):
                    continue
            out.append(v)
        return out


def _split(kind):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            return tuple(int(s) for s in items) if kind == "ints" else tuple(items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BenchConfig field (--out-dir for out_dir; lists comma-separated), plus --skip-compile."""
    for f in dataclasses.fields(BenchConfig):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        kind, help_text = meta.pop("kind", None), meta.pop("help")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif kind:
            parser.add_argument(flag, type=_split(kind), default=None, help=help_text + " (comma-separated)")
        else:
            typ = int if f.name in ("repeats", "warmup", "threads", "seed") else \
                float if f.name == "time_budget" else str
            parser.add_argument(flag, type=typ, default=f.default, help=help_text, **meta)
    parser.add_argument("--skip-compile", action="store_true", help="same as --compile none")


def config_from_args(args) -> BenchConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}
    if getattr(args, "skip_compile", False):
        values["compile"] = "none"
    return BenchConfig(**values)
