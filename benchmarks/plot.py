"""Images/s against batch size, one line per method, from a sampling benchmark's JSON (`ddpm-fast bench`).

    python benchmarks/plot.py benchmarks/results/<device>-<date>.json            # writes <same name>.png
    python benchmarks/plot.py RESULTS.json -o figure.png

One panel per (preset, dtype, steps); both axes logarithmic. Needs matplotlib (the `plot` extra).
"""
import argparse
import json
import os
import sys
import tempfile


def series(rows):
    """{(preset, dtype, steps): {variant: [(batch, images_per_s), ...]}} of the rows that were timed."""
    panels = {}
    for r in rows:
        if r.get("images_per_s") is None:
            continue
        panel = panels.setdefault((r["preset"], r["dtype"], r["steps"]), {})
        panel.setdefault(r["variant"], []).append((r["batch"], r["images_per_s"]))
    return {k: {v: sorted(pts) for v, pts in p.items()} for k, p in sorted(panels.items())}


def plot(results: dict, png_path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = series(results["rows"])
    # one colour per variant across panels, in the JSON's variant order
    order = list(results.get("variants", {})) + sorted({v for p in panels.values() for v in p})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(dict.fromkeys(order))}
    if not panels:
        raise ValueError("no timed rows to plot")
    cols = min(len(panels), 3)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
    for ax, ((preset, dtype, steps), lines) in zip(axes.flat, panels.items()):
        for variant, pts in lines.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=variant, color=colors[variant],
                    linestyle="-" if variant.startswith("ddpm_fast") else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"{preset}, {dtype}, {steps} steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    meta = results.get("meta", {})
    fig.suptitle(f"{meta.get('device', '?')} - torch {meta.get('torch', '?')} - {meta.get('date', '?')}", fontsize=9)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return png_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a sampling benchmark JSON")
    ap.add_argument("-o", "--out", help="PNG path (default: the JSON's path with .png)")
    args = ap.parse_args(argv)
    try:
        with open(args.results) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"plot: cannot read {args.results}: {err}")
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print(plot(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
