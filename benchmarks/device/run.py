"""The GPU kit: one command that checks CUDA, times every stage and trains SAM, within a budget.

    python benchmarks/device/run.py --out "$OUT"              # on the GPU machine (9 minutes)
    python benchmarks/device/run.py --out /tmp/kit --tiny     # the whole kit on the CPU, < 1 min

Parts, in order, each with its share of ``--budget-s`` (time a part leaves unused passes on):

1. ``tests``: the suite's CUDA-marked tests (``Testing/test_cuda.py``), in a child pytest;
2. ``bench``: every stage timed on the packed validation pairs (``bench.py``), for each variant,
   after a warm-up, with Dice checked against the CPU result that ``pack.py`` stored;
3. ``train``: SAM trained on the packed volumes (``train_sam_gpu.py``), in a child process, with
   its weights written as shards into the output folder every minute; with ``--variant cross``
   and packed maps (``pack.py --pair-maps``), ``--cross-share`` of its crop pairs span two
   patients through the maps.

Everything lands flat in ``--out`` (at most 8 files come back from the machine): ``report.json``
and ``report.md`` (everything measured), ``kit.log`` (all output), ``train_log.tsv`` and the
weight shards ``sam_gpu.pth.part*``. Needs torch and numpy only (no SimpleITK), and the packed
data folder (``pack.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

KIT = Path(__file__).resolve().parent
REPO = KIT.parent.parent
for path in (str(REPO), str(KIT)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

PARTS = ("tests", "bench", "train")
DEFAULT_SHARES = {"tests": 0.15, "bench": 0.33, "train": 0.48}  # the rest: the report's margin
TINY_SHARES = {"tests": 0.2, "bench": 0.45, "train": 0.25}  # on a CPU the stages dominate
TRAIN_EXPORT_S = 15.0  # kept free after training for the final weights and the report
TINY_EXPORT_S = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder ($OUT)")
    parser.add_argument("--data", type=Path, default=KIT / "data", help="packed data folder")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (540; tiny 50)")
    parser.add_argument(
        "--shares",
        default=None,
        help="share of the budget per part (tests=0.15,bench=0.33,train=0.48; tiny 0.2/0.45/0.25)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="tests,bench,train (all)")
    parser.add_argument(
        "--train-max-s", type=float, default=None, help="cap on training seconds (tiny: 8)"
    )
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--variant", choices=("official", "cross"), default="official")
    parser.add_argument(
        "--cross-share",
        type=float,
        default=0.5,
        help="cross variant with packed maps (pack.py --pair-maps): cross-patient pair share (0.5)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny settings: the kit on the CPU")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (50.0 if args.tiny else 540.0)
    if args.train_max_s is None and args.tiny:
        args.train_max_s = 8.0
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; use {PARTS}")
    shares = dict(TINY_SHARES if args.tiny else DEFAULT_SHARES)
    for item in (args.shares or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            if name not in PARTS:
                parser.error(f"--shares: unknown part {name!r}")
            shares[name] = float(value)
    if sum(shares[p] for p in args.parts) > 1.0:
        parser.error("--shares add up to more than 1 for the chosen parts")
    args.shares = shares
    return args


class Log:
    """Print and append to ``kit.log``."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def run_tests(deadline: float, log: Log) -> dict:
    """The CUDA-marked tests in a child pytest (``--noconftest``: the suite's conftest reads CT
    with SimpleITK); on a machine without CUDA they are skipped."""
    command = [
        sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--noconftest",
        "-p", "no:cacheprovider", str(REPO / "Testing" / "test_cuda.py"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    timeout = max(deadline - time.perf_counter(), 5.0)
    tick = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        code = "timeout"
    log(output.rstrip())
    words = ("passed", "failed", "skipped", "error", "deselected", "no tests ran")
    summary = [
        line for line in output.splitlines() if " in " in line and any(w in line for w in words)
    ]
    return {
        "exit_code": code,
        "summary": summary[-1].strip("= ") if summary else None,
        "seconds": round(time.perf_counter() - tick, 1),
        "passed": code == 0,
    }


def run_bench(args: argparse.Namespace, deadline: float, device: torch.device, log: Log) -> dict:
    import bench
    import packed
    import stages

    document = packed.read_pairs(args.data)
    pairs = document["pairs"][:1] if args.tiny else document["pairs"]
    out: dict = {"pairs": len(pairs), "spacing_mm": document.get("spacing_mm"), "variants": {}}
    variants = list(stages.VARIANTS)
    for i, variant in enumerate(variants):
        # Each variant gets an equal part of what is left, so a slow one cannot starve the next.
        now = time.perf_counter()
        own_deadline = now + (deadline - now) / (len(variants) - i)
        log(f"bench: {variant} on {len(pairs)} pairs ({device})")
        tick = time.perf_counter()
        try:
            run = bench.run_variant(args.data, pairs, variant, device, own_deadline, log=log)
        except Exception as err:  # a variant that cannot start must not stop the others
            log(traceback.format_exc())
            out["variants"][variant] = {"error": f"{type(err).__name__}: {err}"[:500]}
            continue
        run["seconds"] = round(time.perf_counter() - tick, 1)
        run["summary"] = bench.summarise(run)
        cpu = document.get("cpu", {}).get(variant)
        if cpu:
            run["cpu_check"] = bench.compare_with_cpu(run, cpu)
            run["cpu_summary"] = bench.summarise(cpu)
            run["cpu_machine"] = cpu.get("machine")
        out["variants"][variant] = run
    return out


def run_train(args: argparse.Namespace, budget_s: float, log: Log) -> dict:
    import packed

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the child trains on the same GPU: hand back the bench's cache
    command = [
        sys.executable, str(KIT / "train_sam_gpu.py"), "--data", str(args.data),
        "--out", str(args.out), "--budget-s", f"{budget_s:.0f}", "--device", args.device,
        "--variant", args.variant,
    ]  # fmt: skip
    maps = len(packed.read_pair_maps(args.data)) if args.variant == "cross" else 0
    if maps:
        command += ["--cross-share", str(args.cross_share)]
        log(f"train: {args.cross_share:.0%} cross-patient pairs through {maps} packed maps")
    if args.tiny:
        command += ["--tiny", "--checkpoint-s", str(max(budget_s / 2, 1.0))]
    tick = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=budget_s + 120.0
        )
    except subprocess.TimeoutExpired:
        return {"error": "training did not stop in time", "seconds": budget_s + 120.0}
    log(done.stderr.rstrip())
    lines = done.stdout.strip().splitlines()
    log("\n".join(lines[:-1]))
    if done.returncode != 0 or not lines:
        return {"error": f"exit code {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - tick, 1)
    return result


def write_reports(out: Path, report: dict) -> None:
    import report as report_md

    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_md.markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "kit.log")
    report: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "tiny" if args.tiny else "full",
        "budget_s": args.budget_s,
        "shares": {p: args.shares[p] for p in args.parts},
        "machine": machine(),
    }
    log(json.dumps(report))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    report["device"] = str(device)
    deadline = start
    for part in args.parts:
        deadline += args.shares[part] * args.budget_s
        tick = time.perf_counter()
        log(f"== {part} (until {deadline - start:.0f} s of {args.budget_s:.0f} s)")
        try:
            if part == "tests":
                report["tests"] = run_tests(deadline, log)
            elif part == "bench":
                report["bench"] = run_bench(args, deadline, device, log)
            else:
                reserve = TINY_EXPORT_S if args.tiny else TRAIN_EXPORT_S
                budget = max(deadline - time.perf_counter() - reserve, 1.0)
                budget = min(budget, args.train_max_s or budget)
                report["train"] = run_train(args, budget, log)
        except Exception as err:  # one broken part must not cost the others' figures
            log(traceback.format_exc())
            report[part] = {"error": f"{type(err).__name__}: {err}"[:1000]}
        report.setdefault("part_seconds", {})[part] = round(time.perf_counter() - tick, 1)
        write_reports(args.out, report)  # after every part: a kill keeps what was measured
    report["total_s"] = round(time.perf_counter() - start, 1)
    write_reports(args.out, report)
    log(f"== done in {report['total_s']} s; report in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
