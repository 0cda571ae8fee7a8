"""Training progress: a tqdm bar ("train", steps/s and the loss), RUN_DIR/metrics.jsonl, and the loss-curve PNG.
Rank 0 only."""
import json
import os
import sys
import time

from ..files import atomic_write


class MetricsLog:
    """Appends one JSON line per ``record`` to RUN_DIR/metrics.jsonl and drives the progress bar.

    On resume, lines past the resumed step (logged after the checkpoint a crashed run last wrote) are dropped,
    so the file describes exactly the steps the weights went through. ``elapsed_s`` counts the run's training
    time over all its sessions (it continues from the last kept line's); ``session_s`` this session's alone.
    """

    def __init__(self, run_dir: str, dist, start: int, total: int, log):
        self.enabled = dist.is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.last_step, self.last_time, self.start_time = start, time.perf_counter(), time.perf_counter()
        self.bar, self.elapsed_before = None, 0.0
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        kept = _truncate_after(self.path, start)
        self.elapsed_before = float(kept[-1].get("elapsed_s", 0.0)) if kept else 0.0
        from tqdm import tqdm
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5 if tty else 30.0)
        self.file = open(self.path, "a")

    def record(self, step: int, loss: float, lr: float, decay: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        session = now - self.start_time
        row = {"step": step, "loss": loss, "lr": lr, "ema_decay": decay, "steps_per_s": rate,
               "elapsed_s": self.elapsed_before + session, "session_s": session}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.update(step - self.last_step)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # the bar shows steps/s itself
        self.last_step, self.last_time = step, now

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()


def _truncate_after(path: str, step: int) -> list:
    """Drops the lines of ``path`` whose step is > ``step`` (atomically rewritten); returns the kept rows. A
    missing file is fine (no rows)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep, rows = [], []
    for line in lines:
        try:
            row = json.loads(line)
            if row["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
                rows.append(row)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash
    if keep != lines:
        atomic_write(path, lambda tmp: open(tmp, "w").writelines(keep))
    return rows


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl file (unparseable lines, e.g. cut by a crash, are skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_loss(metrics_path: str, png_path: str, log=print) -> bool:
    """Writes the loss curve (log-scale loss vs step) as a PNG; False (with a note) without matplotlib/data."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no {png_path} (pip install matplotlib, or 'ddpm_fast[plot]')")
        return False
    rows = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    if not rows:
        log(f"no metrics logged: no {png_path}")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over log window)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True
