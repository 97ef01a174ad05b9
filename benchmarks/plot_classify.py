"""Bar chart of ``benchmarks/results/classify.json`` (ours beside the published accuracies):
``python benchmarks/plot_classify.py [--results FILE] [--out PNG]``."""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from spikegpt.cli import new_parser, run_cli  # noqa: E402
from spikegpt.fileio import atomic_write  # noqa: E402


def plot(args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(args.results).read_text())
    rows = [(f"ours, {kind.replace('scratch', 'task only').replace('pretrained', 'pre-trained')}",
             {task: d["table"].get(f"{task}/{kind}", {}).get("accuracy") for task in ("mr", "sst5")})
            for kind in ("scratch", "pretrained")]
    rows += [(name, acc) for name, acc in d["published"].items()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, task, title in zip(axes, ("mr", "sst5"), ("MR (10-fold CV)", "SST-5 (test at best dev)")):
        names = [n for n, acc in rows if acc.get(task) is not None]
        values = [acc[task] for n, acc in rows if acc.get(task) is not None]
        colors = ["tab:orange" if n.startswith("ours") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("accuracy (%)")
        ax.invert_yaxis()
    fig.suptitle("Sentence classification: ours (4x128 SpikeGPT, 4096-token BPE, 2-core CPU) vs published")
    fig.tight_layout()
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {args.out}")


def main(argv=None) -> int:
    p = new_parser("benchmarks/plot_classify.py", __doc__.split("\n")[0])
    p.add_argument("--results", default=str(HERE / "results" / "classify.json"))
    p.add_argument("--out", default=str(HERE / "results" / "classify.png"))
    return run_cli(p, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
