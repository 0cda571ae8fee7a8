"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers send before preempting).

The first signal only sets a flag: the current step finishes, the checkpoint is written (atomically, as always)
and ``Trainer.fit`` raises ``TrainingInterrupted``, which says the step and the exact command that resumes; the
CLI exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal acts at once (the
handlers are back to what they were), for a user who does not want to wait for the checkpoint.

Under DDP every rank must stop after the same step, or the ranks would deadlock in their next collective. Each
rank puts its flag into an all-reduce (max) on a separate gloo group after every step, started without waiting
(so it costs no GPU sync and no stall) and read one step later: all ranks then see the same value at the same
step and stop together, one step after the first rank was signalled.

Test hook (deterministic, no timing): with DDPM_FAST_TEST_SIGNAL="STEP:SIGNAME[:RANK]" in the environment, the
process sends itself SIGNAME right after finishing step STEP (on rank RANK only, when given).
"""
import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TEST_HOOK = "DDPM_FAST_TEST_SIGNAL"


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by ``Trainer.fit`` after a signal stopped the run and its checkpoint was written.

    Attributes: signum, step (steps done and saved), checkpoint (its path; None on ranks other than 0),
    resume_command (a shell command that continues the run), exit_code (128 + signum).
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[str], resume_command: str):
        self.signum, self.step, self.checkpoint, self.resume_command = signum, step, checkpoint, resume_command
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint} written" if checkpoint else "checkpoint written by rank 0"
        super().__init__(f"training stopped by {name} after step {step}; {saved}. Resume with: {resume_command}")


class GracefulStop:
    """A context manager installing the SIGINT/SIGTERM handlers for a run; ``poll()`` after every step returns
    the signal number every rank agrees to stop on, or None. Only the main thread can install handlers; in
    other threads signals keep their previous behaviour."""

    def __init__(self, info, announce: bool = True):
        self.info, self.announce = info, announce
        self.signum: Optional[int] = None
        self._previous = {}
        self._group = self._pending = self._flag = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if self.info.distributed:  # collective: every rank makes the group in the same order
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc):
        self._restore()
        if self._pending is not None:
            self._pending.wait()  # leave no collective in flight
            self._pending = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
        return False

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        self._restore()  # a second signal acts as it would without us
        if self.announce and self.info.is_main:
            os.write(2, f"\n{signal.Signals(signum).name}: finishing the current step and writing the checkpoint "
                        f"(send it again to stop at once without saving)\n".encode())

    def poll(self) -> Optional[int]:
        """Call once per step on every rank: the agreed signal number to stop on now, or None."""
        if not self.info.distributed:
            return self.signum
        decided = None
        if self._pending is not None:
            self._pending.wait()
            decided = int(self._flag.item()) or None
        self._flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return decided


def signal_test_hook(step: int, rank: int) -> None:
    """Sends the signal DDPM_FAST_TEST_SIGNAL asks for when ``step`` (just finished) and ``rank`` match it."""
    spec = os.environ.get(TEST_HOOK)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in signal.Signals.__members__:
        raise ValueError(f"{TEST_HOOK}={spec!r}: expected STEP:SIGNAME[:RANK], e.g. 3:SIGINT")
    if int(parts[0]) == step and (len(parts) == 2 or int(parts[2]) == rank):
        os.kill(os.getpid(), signal.Signals[parts[1]])
