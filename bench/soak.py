"""Soak: the demo for 3,000 steps (a checkpoint and a validation every 100), sampling the memory, open
files and threads of the driver, the training workers, the steward and the validation actor.

    python bench/soak.py [--steps 3000] [--every 100] [--out bench/soak]

Prints, per role, RSS at step ~500 and at the end, its growth, and the spread of fds and threads; writes
`<out>.json` (every sample) and `<out>.png` (RSS, fds and threads over steps). Run it from the repo root
after `bash scripts/setup.sh`; it uses `relay demo` as a user would, in its own run (`soak`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROLES = {"RayTrainWorker": "worker", "RunSteward": "steward", "ValidatorActor": "validator"}


def role_of(proc: psutil.Process, driver: int) -> str | None:
    if proc.pid == driver:
        return "driver"
    try:
        title = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return next((role for name, role in ROLES.items() if title.startswith(f"ray::{name}")), None)


def sample(driver: int) -> dict[str, dict[str, float]]:
    """Per role: RSS (MiB), open fds and threads, summed over that role's processes. Only the driver and
    its descendants count (the local Ray cluster it started): other Ray sessions on the machine do not."""
    out: dict[str, dict[str, float]] = {}
    try:
        root = psutil.Process(driver)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in family:
        role = role_of(proc, driver)
        if role is None:
            continue
        try:
            with proc.oneshot():
                figures = {"rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(), "threads": proc.num_threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        into = out.setdefault(role, {"rss_mib": 0.0, "fds": 0, "threads": 0, "processes": 0})
        for key, value in figures.items():
            into[key] += value
        into["processes"] += 1
    return out


def current_step(progress: Path) -> int | None:
    try:
        return json.loads(progress.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def plot(samples: list[dict], path: Path) -> None:
    """Three panels (RSS, fds, threads) over steps, one line per role, drawn with PIL."""
    from PIL import Image, ImageDraw

    colours = {"driver": (31, 119, 180), "worker": (214, 39, 40), "steward": (44, 160, 44), "validator": (148, 103, 189)}
    width, panel, pad = 900, 220, 50
    image = Image.new("RGB", (width, 3 * panel + 40), "white")
    draw = ImageDraw.Draw(image)
    steps = [s["step"] for s in samples]
    lo, hi = min(steps), max(max(steps), min(steps) + 1)
    for row, metric in enumerate(("rss_mib", "fds", "threads")):
        top = 20 + row * panel
        values = [s["roles"].get(r, {}).get(metric, 0) for s in samples for r in colours]
        vmax = max(values + [1]) * 1.1
        draw.rectangle([pad, top, width - 20, top + panel - 40], outline="black")
        draw.text((pad, top - 14), f"{metric} (0..{vmax:.0f}) over steps {lo}..{hi}", fill="black")
        for role, colour in colours.items():
            points = [
                (
                    pad + (s["step"] - lo) / (hi - lo) * (width - 20 - pad),
                    top + panel - 40 - s["roles"][role][metric] / vmax * (panel - 40),
                )
                for s in samples
                if role in s["roles"]
            ]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            if points:
                draw.text((points[-1][0] - 60, points[-1][1] - 12), role, fill=colour)
    image.save(path)


def growth(samples: list[dict], role: str, metric: str, from_step: int) -> tuple[float, float] | None:
    series = [(s["step"], s["roles"][role][metric]) for s in samples if role in s["roles"] and s["step"] < samples[-1]["step"]]
    start = next((v for step, v in series if step >= from_step), None)
    return (start, series[-1][1]) if series and start is not None else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100, help="checkpoint and validation interval")
    parser.add_argument("--from-step", type=int, default=500, help="growth is measured from here to the end")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--out", default="bench/soak")
    args = parser.parse_args()
    relay = str(Path(sys.executable).with_name("relay"))
    command = [
        relay,
        "demo",
        "--set",
        "output_dir=output/soak",
        "--set",
        f"max_train_steps={args.steps}",
        "--set",
        f"checkpointing_steps={args.every}",
        "--set",
        f"validation_steps={args.every}",
        "--set",
        "resume_from_checkpoint=latest",
    ]
    progress = Path("output/ray/soak/relay/progress.json")
    start = time.monotonic()
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[dict] = []
    while driver.poll() is None:
        step = current_step(progress)
        if step is not None:
            samples.append({"time": time.monotonic() - start, "step": step, "roles": sample(driver.pid)})
        time.sleep(args.interval)
    if driver.returncode != 0 or not samples:
        print(f"the demo exited {driver.returncode} after {len(samples)} sample(s)")
        return 1
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(samples))
    plot(samples, out.with_suffix(".png"))
    print(
        f"soak: {args.steps} steps, checkpoint + validation every {args.every}, {time.monotonic() - start:.0f} s, "
        f"{len(samples)} samples; growth from step {args.from_step} to the end"
    )
    print(f"{'role':<10} {'RSS MiB start':>14} {'end':>8} {'growth':>8}   {'fds min..max':>13}   {'threads min..max':>16}")
    for role in ("driver", "worker", "steward", "validator"):
        rss = growth(samples, role, "rss_mib", args.from_step)
        if rss is None:
            continue
        after = [s["roles"][role] for s in samples if role in s["roles"] and s["step"] >= args.from_step]
        fds = [a["fds"] for a in after]
        threads = [a["threads"] for a in after]
        print(
            f"{role:<10} {rss[0]:>14.0f} {rss[1]:>8.0f} {100 * (rss[1] / rss[0] - 1):>7.1f}%   "
            f"{min(fds):>6.0f}..{max(fds):<6.0f}   {min(threads):>8.0f}..{max(threads):<7.0f}"
        )
    print(f"plot: {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
