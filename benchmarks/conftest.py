"""Shared set-up for the pytest-benchmark suites: GPU cases skip cleanly without CUDA, and the report header
says what the numbers were measured on (device, threads, torch)."""
import pytest
import torch


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"ddpm_fast benchmarks: {device}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
