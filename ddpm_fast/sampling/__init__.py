"""``ddpm_fast.sample``: argument resolution (args), the chunk loop shared by eager runs and graph captures (loop),
CUDA graphs of the whole reverse loop or one step (graphs), the public call itself (sample), and evaluation-scale
runs to a directory over many processes (shard: ``sample_to_dir``; its manifest and chunk files: manifest,
chunkfiles)."""
from .graphs import clear_graph_cache
from .sample import last_run_info, sample
from .shard import DirRun, sample_to_dir

__all__ = ["DirRun", "clear_graph_cache", "last_run_info", "sample", "sample_to_dir"]
