"""Rewrite the measured-figures section of docs/runbook.md from bench/: step times (bench/gpu_step_*.json),
the data-parallel overhead (bench/RESULTS.md's production arithmetic), the checkpoint's size (bench/RESULTS.md)
and the cost of a 300k-step run at each of them.

    python scripts/runbook_figures.py            # rewrite the section between the markers
    python scripts/runbook_figures.py --check    # exit 1 when the section is stale (tests/unit/test_infra.py)

Prices are assumptions (us-east-1, check the EC2 pricing pages before a run); everything else is read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docs/runbook.md"
RESULTS = REPO / "bench/RESULTS.md"
BEGIN, END = "<!-- runbook_figures: begin (python scripts/runbook_figures.py) -->", "<!-- runbook_figures: end -->"

STEPS = 300_000  # max_train_steps of configs/sd3/config.json
WORKERS = 4  # num_workers of configs/sd3/cluster.json
LINK = ("4", "10 Gb/s", "fp32")  # the production-arithmetic row for 4 nodes on g6e/p5.4xlarge-class networking
GOODPUT = 0.9  # assumed: paid time that produced kept steps (0 steps lost per announced reclaim)
TARGET_STEP = 0.5  # the GPU-step issue's target, not a measurement
# Dense bf16 peaks (TFLOP/s, datasheets): the L40S step is not measured, so it is scaled from the H100's.
PEAK_BF16 = {"H100": 989.4, "L40S": 362.05}
# A validation round on the spot g6e.xlarge: node start from a baked image, the prompts, then idle_timeout_s.
VALIDATION_ROUND_HOURS = (4 + 5 + 10) / 60
VALIDATION_EVERY = 5_000
DISK_GB, DISK_PER_GB_MONTH = 100 + 4 * 200, 0.08  # the head's and four workers' gp3 volumes

# $/h, us-east-1, assumed. p5.4xlarge: one eighth of p5.48xlarge's $55.04 on demand; spot ~40% of it.
PRICES = {
    "g6e.2xlarge": (0.90, 2.24),  # (spot, on demand)
    "g6e.4xlarge": (1.20, 3.00),
    "p5.4xlarge": (2.75, 6.88),
    "g6e.xlarge": (0.75, 1.86),
    "m7i.xlarge": (0.2016, 0.2016),
}


@dataclass(frozen=True)
class StepTime:
    label: str
    seconds: float
    source: str
    instance: str  # where it is priced


def _step(path: str, compiled: bool = False) -> float:
    data = json.loads((REPO / path).read_text())
    return data["compile"]["s_per_step"] if compiled else data["configs"]["a"]["s_per_step"]


def _table_rows(heading: str) -> list[list[str]]:
    """The markdown table rows under the first line of RESULTS.md that starts with `heading`."""
    text = RESULTS.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows


def data_parallel_overhead() -> tuple[float, float, float]:
    """(single-GPU step, overlapped 4-node step, blocking 4-node step) from the production arithmetic."""
    rows = _table_rows("| nodes | link | wire |")
    row = next(r for r in rows if tuple(r[:3]) == LINK)
    single = float(re.search(r"measured H100 step is ([\d.]+) s", RESULTS.read_text()).group(1))
    return single, float(row[5]), float(row[4])


def checkpoint_figures() -> dict[str, float]:
    rows = _table_rows("| figure | value | unit |")
    return {r[0].split(" (")[0]: float(r[1]) for r in rows}


AFTER = "bench/gpu_step_h200.json"


def step_times() -> list[StepTime]:
    h100 = _step("bench/gpu_step_h100.json")
    return [
        StepTime("H100, eager (measured)", h100, "bench/gpu_step_h100.json", "p5.4xlarge"),
        StepTime(
            "H200, eager (measured)", _step("bench/gpu_step_h200_before.json"), "bench/gpu_step_h200_before.json", "p5.4xlarge"
        ),
        StepTime(
            "H200, regional compile (measured)",
            _step("bench/gpu_step_h200_compile.json", compiled=True),
            "bench/gpu_step_h200_compile.json",
            "p5.4xlarge",
        ),
        *(
            [StepTime("H200, the recipe as relay train runs it (measured)", _step(AFTER), AFTER, "p5.4xlarge")]
            if (REPO / AFTER).is_file()  # bench/gpu_h200.sh's "after" stage, once a GPU session copies it in
            else [StepTime("target of the GPU-step work (not measured)", TARGET_STEP, "the GPU-step issue", "p5.4xlarge")]
        ),
        StepTime(
            "L40S, eager (estimate: H100 × the dense bf16 ratio)",
            h100 * PEAK_BF16["H100"] / PEAK_BF16["L40S"],
            "not measured",
            "g6e.2xlarge",
        ),
    ]


def run_cost(step: float, instance: str, on_demand: bool) -> tuple[float, float]:
    """(wall hours, dollars) of a 300k-step run: H = S × T / 3600 / g; cost = H × (N × worker + head + disks)
    + validation rounds × round hours × the validation node's price (it scales to zero between rounds)."""
    hours = STEPS * step / 3600 / GOODPUT
    worker = PRICES[instance][1 if on_demand else 0]
    disks = DISK_GB * DISK_PER_GB_MONTH / 730
    validation = STEPS / VALIDATION_EVERY * VALIDATION_ROUND_HOURS * PRICES["g6e.xlarge"][1 if on_demand else 0]
    return hours, hours * (WORKERS * worker + PRICES["m7i.xlarge"][0] + disks) + validation


def render() -> str:
    single, overlapped, blocking = data_parallel_overhead()
    exposed = overlapped - single
    ckpt = checkpoint_figures()
    lines = [
        BEGIN,
        "",
        "Measured step times (batch 4 at 1024², int8 base + LoKr, gradient checkpointing), and the step of a",
        f"{WORKERS}-node group: the adapter's all-reduce overlapped with backward leaves {exposed:.3f} s exposed at",
        f"{LINK[1]} ({LINK[2]}; bench/RESULTS.md, production arithmetic: {overlapped:.3f} s overlapped against",
        f"{blocking:.3f} s blocking on the H100).",
        "",
        "| step | s/step, 1 GPU | s/step, group of 4 | from |",
        "|---|---|---|---|",
    ]
    for s in step_times():
        lines.append(f"| {s.label} | {s.seconds:.3f} | {s.seconds + exposed:.3f} | {s.source} |")
    lines += [
        "",
        f"Cost of one {STEPS:,}-step run with {WORKERS} one-GPU workers at each step time above: the H100 and H200",
        "rows on p5.4xlarge (AWS sells H200s only eight to a node, so those rows are what the H100 workers would",
        "cost at that step time), the L40S row on g6e.2xlarge. Goodput",
        f"{GOODPUT} assumed, the on-demand m7i.xlarge head, {DISK_GB} GB of gp3, and {STEPS // VALIDATION_EVERY}",
        f"validation rounds of {VALIDATION_ROUND_HOURS * 60:.0f} minutes on the g6e.xlarge (billed only while it is up;",
        "it scales to zero between rounds). Spot and on-demand prices are assumptions (table below).",
        "",
        "| step | workers | wall time | spot workers | on-demand workers |",
        "|---|---|---|---|---|",
    ]
    for s in step_times():
        hours, spot = run_cost(s.seconds + exposed, s.instance, on_demand=False)
        _, demand = run_cost(s.seconds + exposed, s.instance, on_demand=True)
        lines.append(
            f"| {s.label}: {s.seconds + exposed:.3f} s | {WORKERS} × {s.instance} | {hours:,.0f} h ({hours / 24:.1f} days)"
            f" | ${spot:,.0f} | ${demand:,.0f} |"
        )
    lines += [
        "",
        "| instance | GPU | spot $/h (assumed) | on-demand $/h (assumed) |",
        "|---|---|---|---|",
    ]
    gpus = {"g6e.2xlarge": "L40S", "g6e.4xlarge": "L40S", "p5.4xlarge": "H100", "g6e.xlarge": "L40S (validation)"}
    for instance, (spot, demand) in PRICES.items():
        lines.append(f"| {instance} | {gpus.get(instance, 'none (head)')} | {spot:.2f} | {demand:.2f} |")
    size, adapter, write = ckpt["checkpoint size"], ckpt["adapter alone"], ckpt["checkpoint written to local disk"]
    lines += [
        "",
        f"A checkpoint is {size:.1f} GB (the adapter alone {adapter:.3f} GB), written locally in {write:.0f} s,",
        f"then uploaded; the newest 5 in S3 are {5 * size:.0f} GB.",
        "",
        END,
    ]
    return "\n".join(lines)


def section(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/runbook.md's section is stale")
    args = parser.parse_args(argv)
    text, fresh = RUNBOOK.read_text(), render()
    if section(text) == fresh:
        return 0
    if args.check:
        print("docs/runbook.md: the measured-figures section is stale; run python scripts/runbook_figures.py", file=sys.stderr)
        return 1
    RUNBOOK.write_text(text.replace(section(text), fresh))
    print("docs/runbook.md: measured-figures section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
