"""Ablation of the MulCLIP losses on the built-in synthetic scenes (results in docs/ablation.md).

    python scripts/ablation.py                      # 4 variants x 3 seeds, then evaluation and report

Trains `mulclip-tiny` from scratch with `python -m mulclip.train`, same data, steps and seeds for
every variant:

    global  lambda_wpr = lambda_sap = 0 (global loss only: long + 1/2 short caption contrast)
    no_sap  lambda_sap = 0 (global + WPR)
    no_wpr  lambda_wpr = 0 (global + SAP)
    full    lambda_wpr = lambda_sap = 1 (MulCLIP)

then evaluates every checkpoint with `python -m mulclip.eval` on held-out scenes, with and
without the subcaption rerank. The rerank's beta is chosen on a separate selection set (held-out
scenes of data seed 1: mean long-caption R@1 of the full variant) and reported on the test set
(held-out scenes of data seed 0, what mulclip.train evaluates on), so the test numbers are not
tuned on themselves. Writes the aggregated results (`--results`, JSON), prints the markdown table
and draws the training curves (`--plot`). Interrupted runs continue where they stopped: finished
trainings and evaluations are kept and skipped.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "global": ["--lambda-wpr", "0", "--lambda-sap", "0"],
    "no_sap": ["--lambda-sap", "0"],
    "no_wpr": ["--lambda-wpr", "0"],
    "full": [],
}
TITLES = {
    "global": "global only (lambda_wpr = lambda_sap = 0)",
    "no_sap": "without SAP (global + WPR)",
    "no_wpr": "without WPR (global + SAP)",
    "full": "full MulCLIP",
}
# About 2-3 minutes per run on 2 shared CPU cores: 96 steps of 32 scenes, each scene seen once.
TRAIN = ["--model", "mulclip-tiny", "--batch-size", "32", "--train-num-samples", "3072", "--epochs", "1",
         "--warmup", "10", "--val-data", "", "--no-tensorboard", "--log-every-n-steps", "16"]
BETAS = ["0.25", "0.5", "1", "2"]
EVAL = ["--data", "synthetic", "--num-samples", "512", "--negatives", "3", "--rerank-beta", *BETAS]
SELECTION_SEED, TEST_SEED = "1", "0"
R1 = ("long/image_to_text_R@1", "long/text_to_image_R@1")


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def train_all(logs: str, seeds) -> dict:
    """Train every (variant, seed) not finished yet; returns wall seconds per run (measured now or before)."""
    timing_path = os.path.join(logs, "train_seconds.json")
    seconds = json.load(open(timing_path)) if os.path.isfile(timing_path) else {}
    for seed in seeds:
        for variant, flags in VARIANTS.items():
            name = run_name(variant, seed)
            if os.path.isfile(os.path.join(logs, name, "checkpoints", "epoch_1.pt")):
                continue
            resume = ["--resume", "latest"] if os.path.isdir(os.path.join(logs, name)) else []
            command = [sys.executable, "-m", "mulclip.train", *TRAIN, *flags, "--seed", str(seed), "--logs", logs,
                       "--name", name, *resume]
            print(f"[ablation] {' '.join(command)}", flush=True)
            tic = time.time()
            subprocess.run(command, check=True)
            seconds[name] = round(time.time() - tic, 1)
            with open(timing_path, "w") as f:
                json.dump(seconds, f, indent=1)
    return seconds


def evaluate_all(logs: str, seeds, data_seed: str, output: str) -> dict:
    """One mulclip.eval call over every checkpoint (one column each), unless `output` already has them all."""
    names = [run_name(v, s) for s in seeds for v in VARIANTS]
    if os.path.isfile(output):
        with open(output) as f:
            done = json.load(f)
        if set(names) <= set(done["models"]):
            return done
    command = [sys.executable, "-m", "mulclip.eval", "--checkpoint", *[os.path.join(logs, n) for n in names],
               *EVAL, "--data-seed", data_seed, "--output", output]
    print(f"[ablation] {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    with open(output) as f:
        return json.load(f)


def mean_r1(values: dict, prefix: str = "") -> float:
    return sum(values[prefix + key] for key in R1) / len(R1)


def summarise(samples):
    return {"mean": statistics.fmean(samples), "std": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "min": min(samples), "max": max(samples), "values": samples}


def aggregate(selection: dict, test: dict, seeds) -> dict:
    """Per row (variant, with or without rerank): mean / std / min / max over seeds of each reported metric."""
    def full_selection_r1(beta):
        return statistics.fmean(mean_r1(selection["models"][run_name("full", s)]["metrics"], f"rerank{beta}/")
                                for s in seeds)

    beta = max(BETAS, key=lambda b: (full_selection_r1(b), -float(b)))
    rows = {}
    for variant in VARIANTS:
        for rerank in ("", f"rerank{beta}/"):
            per_seed = [test["models"][run_name(variant, s)]["metrics"] for s in seeds]
            row = {
                "image_to_text_R@1": summarise([m[rerank + R1[0]] for m in per_seed]),
                "text_to_image_R@1": summarise([m[rerank + R1[1]] for m in per_seed]),
                "mean_R@1": summarise([mean_r1(m, rerank) for m in per_seed]),
                "short_mean_R@1": summarise([(m[rerank + "short/image_to_text_R@1"] + m[rerank + "short/text_to_image_R@1"])
                                             / 2 for m in per_seed]),
                "hard_negative_accuracy": summarise([m[rerank + "hard_negative_accuracy"] for m in per_seed]),
            }
            rows[variant + (f" + rerank (beta={beta})" if rerank else "")] = row
    return {"beta": beta, "selection_full_mean_R@1": {b: full_selection_r1(b) for b in BETAS}, "rows": rows}


def markdown_table(summary: dict) -> str:
    def cell(stat):
        return f"{stat['mean']:.1f} ± {stat['std']:.1f} ({stat['min']:.1f}–{stat['max']:.1f})"

    rerank = f" + rerank (beta={summary['beta']})"
    order = [name for variant in VARIANTS for name in (variant, variant + rerank)]
    lines = ["| variant | I→T R@1 | T→I R@1 | mean R@1 | hard-negative acc. |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in order:
        row = summary["rows"][name]
        title = TITLES[name] if name in TITLES else TITLES[name.split(" ")[0]].split(" (")[0] + rerank
        lines.append(f"| {title} | {cell(row['image_to_text_R@1'])} | {cell(row['text_to_image_R@1'])} | "
                     f"{cell(row['mean_R@1'])} | {cell(row['hard_negative_accuracy'])} |")
    return "\n".join(lines)


def read_curves(logs: str, seeds):
    """{variant: {key: [per-seed list of per-step values]}} from each run's metrics.jsonl (in step order)."""
    curves = {}
    for variant in VARIANTS:
        curves[variant] = {}
        for seed in seeds:
            with open(os.path.join(logs, run_name(variant, seed), "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f]
            # A resumed run appends the steps it repeats after its last checkpoint: keep the last record per step.
            records = list({r["step"]: r for r in records if "loss" in r}.values())
            for key in ("global_loss", "wpr_loss", "sap_loss"):
                curves[variant].setdefault(key, []).append([r[key] for r in records])
    return curves


def plot(curves: dict, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"global": "tab:gray", "no_sap": "tab:blue", "no_wpr": "tab:orange", "full": "tab:green"}
    panels = [("global_loss", "global loss (long + 1/2 short contrast)", VARIANTS),
              ("wpr_loss", "WPR loss (where trained)", ("no_sap", "full")),
              ("sap_loss", "SAP loss (where trained)", ("no_wpr", "full"))]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    window = 8
    for ax, (key, title, variants) in zip(axes, panels):
        for variant in variants:
            values = np.array(curves[variant][key])  # (seeds, steps)
            kernel = np.ones(window) / window
            smooth = np.array([np.convolve(v, kernel, mode="valid") for v in values])
            steps = np.arange(smooth.shape[1]) + window
            ax.plot(steps, smooth.mean(0), color=colors[variant], label=variant)
            ax.fill_between(steps, smooth.min(0), smooth.max(0), color=colors[variant], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"step (moving average of {window})")
        ax.legend(fontsize=8)
    ax = axes[3]
    names = list(summary["rows"])
    x = np.arange(len(names))
    for offset, metric, color in ((-0.2, "mean_R@1", "tab:purple"), (0.2, "hard_negative_accuracy", "tab:red")):
        stats = [summary["rows"][n][metric] for n in names]
        means = np.array([s["mean"] for s in stats])
        ax.bar(x + offset, means, 0.4, color=color, label=metric.replace("_", " "),
               yerr=[means - [s["min"] for s in stats], [s["max"] for s in stats] - means], capsize=3)
    ax.axhline(25, color="tab:red", linestyle=":", linewidth=1, label="hard-negative chance (1 in 4)")
    ax.set_xticks(x, [n.replace(" + rerank", "\n+ rerank") for n in names], fontsize=7, rotation=30, ha="right")
    ax.set_title("held-out scenes, mean and min-max over seeds (%)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", default="logs/ablation", help="folder of the training runs and evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default="docs/ablation_results.json", help="aggregated results (JSON)")
    parser.add_argument("--plot", default="docs/ablation_curves.png", help="training curves (PNG)")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds: give at least 2 seeds (the table reports a spread)")
    os.makedirs(args.logs, exist_ok=True)
    seconds = train_all(args.logs, args.seeds)
    selection = evaluate_all(args.logs, args.seeds, SELECTION_SEED, os.path.join(args.logs, "eval_selection.json"))
    test = evaluate_all(args.logs, args.seeds, TEST_SEED, os.path.join(args.logs, "eval_test.json"))
    summary = aggregate(selection, test, args.seeds)
    summary.update(seeds=args.seeds, train_flags=TRAIN, eval_flags=EVAL, variants=VARIANTS, train_seconds=seconds,
                   per_run_test_metrics={n: m["metrics"] for n, m in test["models"].items()})
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(summary, f, indent=1)
    plot(read_curves(args.logs, args.seeds), summary, args.plot)
    print(f"\nrerank beta chosen on the selection scenes: {summary['beta']} "
          f"(full variant mean R@1 by beta: {summary['selection_full_mean_R@1']})\n")
    print(markdown_table(summary))
    print(f"\nwrote {args.results} and {args.plot}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
