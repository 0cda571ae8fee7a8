"""Training: ``TrainConfig`` (config), the per-step pieces and their exact-resume randomness (step), the CUDA-graph
capture of a whole step (graph), progress and metrics files (log), and the ``Trainer`` / ``train`` that runs it.
Names load on first use, so ``training.config`` (what the CLI parser needs) imports without torch."""

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "resume_config", "train"]


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name == "TrainingInterrupted":
        from .signals import TrainingInterrupted
        return TrainingInterrupted
    if name == "resume_config":
        from .resume import resume_config
        return resume_config
    if name in ("Trainer", "train"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
