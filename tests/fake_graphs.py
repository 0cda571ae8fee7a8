"""A stand-in for CUDA graphs on the CPU, for the sampling tests (``sampling.graphs.BACKEND`` swapped in):
capture keeps the body, replay re-runs it, the stream and memory calls do nothing. It proves the graph
machinery's control flow (caching, replay order, fallbacks) without a GPU; tests subclass it to record more."""
import contextlib
import types

from ddpm_fast.sampling import graphs as sampler_graph


class ReplayBody(sampler_graph.CudaGraphBackend):
    """Records each capture's kind in ``captured``; a kind in ``fail`` raises as a failed capture would."""

    def __init__(self, fail=()):
        self.fail, self.captured = set(fail), []

    def available(self, device):
        return True

    def pool(self):
        return None

    @contextlib.contextmanager
    def side_stream(self, device):
        yield

    def synchronize(self, device):
        pass

    def memory(self, device):
        return 0, 0

    def capture(self, body, pool, kind, device=None):
        self.captured.append(kind)
        if kind in self.fail:
            raise RuntimeError(f"simulated {kind} capture failure")
        return types.SimpleNamespace(replay=body)
