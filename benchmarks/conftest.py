"""Shared set-up for the pytest-benchmark suites: GPU cases skip cleanly without CUDA, the report header says what
the numbers were measured on (device, threads, torch), and the fixtures the smoke tests share (one thread; a
benchmark script loaded as a module)."""
import importlib.util
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"ddpm_fast benchmarks: {device}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Tiny work runs best on one thread; with two on a loaded 2-core machine every op's parallel region waits
    for a descheduled thread (10-50x slower measured here), which would only make these smoke tests slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bench_script():
    """bench_script(name): benchmarks/<name>.py loaded as a fresh module (the scripts are files, not a package)."""
    def load(name):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
