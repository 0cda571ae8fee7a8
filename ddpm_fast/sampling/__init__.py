"""``ddpm_fast.sample``: argument resolution (args), the chunk loop shared by eager runs and graph captures (loop),
CUDA graphs of the whole reverse loop or one step (graphs), and the public call itself (sample)."""
from .graphs import clear_graph_cache
from .sample import last_run_info, sample

__all__ = ["clear_graph_cache", "last_run_info", "sample"]
