"""Training: ``TrainConfig`` (config), the per-step pieces and their exact-resume randomness (step), the CUDA-graph
capture of a whole step (graph), progress and metrics files (log), and the ``Trainer`` / ``train`` that runs it.
Names load on first use, so ``training.config`` (what the CLI parser needs) imports without torch."""

__all__ = ["TrainConfig", "Trainer", "train"]


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name in ("Trainer", "train"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
