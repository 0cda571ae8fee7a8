"""The device guard every launch and capture goes through, and the lazy driver probe of the compiled CUDA kernels.

No GPU here: CUDA's Python API is replaced by recorders, so the tests show WHICH device each launch, stream and
capture is put on, and what the probe decides from given driver / runtime versions and launch results."""
import contextlib
import types
import warnings

import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.ops import _ext, device
from ddpm_fast.ops import group_norm_silu as gns

needs_triton = pytest.mark.triton_cpu  # see conftest.py


@pytest.fixture
def guarded(monkeypatch):
    """Records the device of every on_device() entered (the launches still run: on the CPU it is a no-op)."""
    seen = []
    real = device.on_device

    def record(dev):
        seen.append(torch.device(dev))
        return real(dev)

    monkeypatch.setattr(device, "on_device", record)
    return seen


@needs_triton
def test_every_triton_launch_goes_through_the_device_guard(guarded, seed):
    """p_step, seeded_randn, q_sample and both GroupNorm+SiLU kernels enter their tensor's device before launching
    (Triton launches on the CURRENT device: a model on cuda:1 needs cuda:1 current)."""
    from ddpm_fast.ops.noise import seeded_randn
    from ddpm_fast.ops.p_step import p_step
    from ddpm_fast.ops.q_sample import q_sample
    from ddpm_fast.ops.triton import group_norm_silu as tk
    sched = NoiseSchedule.linear(10)
    x = torch.randn(2, 4, 3, 3)
    p_step(sched, torch.randn_like(x), x, 3, seed=1, backend="triton")
    seeded_randn((5,), 1, backend="triton")
    q_sample(sched, x, torch.tensor([1, 2]), seed=1, backend="triton")
    y, mean, rstd = tk._group_norm_silu_fwd(x, None, None, 2, 1e-5)
    tk._group_norm_silu_bwd(torch.randn_like(x), x, None, None, mean, rstd, 2)
    assert guarded == [torch.device("cpu")] * 5


class FakeCuda:
    """torch.cuda's stream/device/graph API as recorders: which device is current, which stream each thing uses."""

    def __init__(self, monkeypatch, current=0):
        self.current, self.log = current, []
        fake = self

        class Stream:
            def __init__(self, dev=None):
                index = dev if isinstance(dev, int) else fake.current if dev is None else torch.device(dev).index
                self.device, self.cuda_stream = torch.device("cuda", index), 1234
                fake.log.append(("stream", self.device.index))

            def wait_stream(self, other):
                pass

            def is_capturing(self):
                return False

        @contextlib.contextmanager
        def device_ctx(dev):
            dev = torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
            before, fake.current = fake.current, dev.index
            fake.log.append(("device", dev.index))
            yield
            fake.current = before

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            fake.log.append(("capture", stream.device.index, fake.current, capture_error_mode))
            yield

        for name, value in (("Stream", Stream), ("device", device_ctx), ("graph", graph),
                            ("stream", lambda s: contextlib.nullcontext()),
                            ("current_stream", lambda dev=None: Stream(dev)),
                            ("CUDAGraph", types.SimpleNamespace), ("synchronize", lambda dev=None: None),
                            ("current_device", lambda: fake.current)):
            monkeypatch.setattr(torch.cuda, name, value)


def test_capture_runs_on_the_tensors_device_in_thread_local_mode(monkeypatch):
    """A capture for cuda:1 while cuda:0 is current: the warm-up and the captured body run with cuda:1 current, the
    capture stream belongs to cuda:1 (torch.cuda.graph's default stream is created once, on whatever device was
    current first), and the error mode is thread_local (a DataLoader's pin-memory thread may call CUDA meanwhile)."""
    cuda = FakeCuda(monkeypatch, current=0)
    during = []
    device.capture_graph(lambda: during.append(cuda.current), torch.device("cuda", 1), warmup=2)
    assert during == [1, 1, 1]
    assert ("capture", 1, 1, "thread_local") in cuda.log
    assert all(entry[1] == 1 for entry in cuda.log if entry[0] in ("stream", "device"))
    assert cuda.current == 0  # restored


def test_sampling_and_training_captures_use_the_helper(monkeypatch):
    from ddpm_fast.sampling import graphs
    from ddpm_fast.training import graph as train_graph
    calls = []
    monkeypatch.setattr(device, "capture_graph", lambda body, dev, pool=None, warmup=0: calls.append(
        (dev, pool, warmup)) or "graph")
    assert graphs.CudaGraphBackend().capture(lambda: None, "pool", "whole", torch.device("cuda", 1)) == "graph"
    step = types.SimpleNamespace(x0=torch.empty(1), params=[], ema=types.SimpleNamespace(shadow=[]),
                                 optimizer=types.SimpleNamespace(state={}), seed=torch.zeros(1),
                                 loss_sum=torch.zeros(()), _body=lambda: None)
    monkeypatch.setattr(train_graph, "check_capturable", lambda s: None)
    train_graph.capture(step, warmup=3)
    assert calls == [(torch.device("cuda", 1), "pool", 0), (torch.device("cpu"), None, 3)]
    assert step.graph == "graph"


class FakeExt:
    with_cuda = True

    def __init__(self, driver, runtime=13000, launch_error=""):
        self.driver, self.runtime, self.launch_error, self.probes = driver, runtime, launch_error, 0

    def cuda_driver_version(self):
        return self.driver

    def cuda_runtime_version(self):
        return self.runtime

    def cuda_probe(self, stream):
        self.probes += 1
        return self.launch_error


@pytest.fixture
def probe(monkeypatch):
    def install(ext):
        FakeCuda(monkeypatch)
        monkeypatch.setattr(_ext, "load", lambda: ext)
        monkeypatch.setattr(device, "_USABLE", {})
        return ext
    return install


@pytest.mark.parametrize("driver,launch_error,usable", [
    (13000, "", True), (13020, "", True),
    (12040, "", False),  # a 550 driver: CUDA 12.4 < the extension's 13.0 runtime
    (13000, "cudaErrorNoKernelImageForDevice: no kernel image is available", False),  # an unsupported GPU
    (0, "", False)])  # no driver
def test_driver_probe_decides_once_per_device_and_warns_once(probe, driver, launch_error, usable):
    ext = probe(FakeExt(driver, launch_error=launch_error))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert device.cuda_kernels_usable(torch.device("cuda", 0)) is usable
        assert device.cuda_kernels_usable(torch.device("cuda", 0)) is usable  # cached: no second probe
        assert device.cuda_kernels_usable(torch.device("cuda", 1)) is usable  # another device: its own probe
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == (0 if usable else 2)  # one warning per device that fails
    if not usable:
        assert "cuda:0" in msgs[0] and "extension built with CUDA runtime 13.0" in msgs[0]
        assert f"driver CUDA {device._version(driver)}" in msgs[0] and "Triton" in msgs[0]
    assert ext.probes == (2 if driver >= 13000 else 0)  # the launch only after the versions passed
    assert not device.cuda_kernels_usable(torch.device("cpu"))


def test_group_norm_silu_routes_to_triton_when_the_probe_fails(probe):
    probe(FakeExt(12040))
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, shape=(2, 4, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwd = gns._pick_fwd(x, 2)
    assert fwd is not gns._fwd_cpp  # Triton (or the reference without triton), never the unusable kernels


def test_importing_ddpm_fast_never_probes_or_initialises_cuda():
    """The probe runs at the first CUDA call of an op, never at import (a context on GPU 0 in every torchrun rank).
    """
    import subprocess
    import sys
    script = ("import torch, ddpm_fast, ddpm_fast.ops.group_norm_silu, ddpm_fast.ops.p_step, ddpm_fast.sampling, "
              "ddpm_fast.training\nfrom ddpm_fast.ops import device\n"
              "assert not torch.cuda.is_initialized() and device._USABLE == {}\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.gpu
def test_second_gpu_runs_its_own_kernels_while_the_first_is_current(seed):
    """With two GPUs: p_step, seeded_randn and GroupNorm+SiLU on cuda:1 while cuda:0 is current give what they give
    on cuda:0 (the kernels ran on the tensors' device), and a whole-loop graph captured there replays the same."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from ddpm_fast import sample
    from ddpm_fast.ops.noise import seeded_randn
    from ddpm_fast.ops.p_step import p_step
    sched = NoiseSchedule.linear(10)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        x = seeded_randn((2, 4, 8, 8), seed, device=dev)
        y = p_step(sched, torch.tanh(x), x, 5, seed=seed)
        z = gns.group_norm_silu(x, 2)
        results[dev] = [t.cpu() for t in (x, y, z)]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from ddpm_fast.models import UNet
    torch.manual_seed(0)
    model = UNet.preset("tiny", ch_mult=(1, 2)).to("cuda:1")
    torch.cuda.set_device(0)
    graphed = sample(model, 2, 5, seed=seed, progress=False)
    eager = sample(model, 2, 5, seed=seed, progress=False, cuda_graph=False)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
