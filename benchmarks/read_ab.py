"""Same-run A/B of the cache's streaming read between two checkouts of fastkd.

    git worktree add /tmp/baseline <commit>
    python benchmarks/read_ab.py --baseline /tmp/baseline --out benchmarks/results/<folder>

One ``rows x vocab`` fp16 cache is written with the *baseline's* writer (so both sides can read
it: a newer reader reads older formats). Then each side is timed in a fresh process per round,
the sides alternating (and which goes first alternating too), over the same files in the page
cache:

- ``sequential``: every row once per pass by slices ``cache[i:i+B]`` (zero-copy views), each
  copied into a preallocated staging buffer (as ``benchmarks/cache_workloads.py`` does), the
  previous slice alive while the next is read; two warm-up passes, then the median of
  ``--passes`` passes.
- ``gather``: every row once per pass by ``cache.gather`` of random batches (copies).

A round's figure is its median time per slice; the table gives each side's median over rounds,
their spread (min-max) and the candidate / baseline ratio of the medians. Process-to-process
variation on a shared machine is several percent, so use at least 8 rounds.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.env import capture_environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Both scripts run with the side's checkout first on sys.path, so ``fastkd`` is that side's; the
# workloads come from this checkout's benchmarks/cache_workloads.py (the preset's own read passes).
PRELUDE = """
import sys
sys.path.insert(0, sys.argv[1])
import fastkd.cache
sys.path.insert(0, sys.argv[2])
from benchmarks import cache_workloads as work
"""

WRITE = PRELUDE + """
work.synthetic_logit_cache(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
"""

READ = PRELUDE + """
import json, statistics, time
from fastkd.cache import LogitCache
cache = LogitCache(sys.argv[3])
batch_size, passes, pattern = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
if pattern == "sequential":
    staging = work.staging_buffer(cache, batch_size)
    one_pass = lambda: work.read_sequential_pass(cache, batch_size, staging)
else:
    one_pass = lambda: work.read_gather_pass(cache, batch_size)
one_pass(); one_pass()
seconds = []
for _ in range(passes):
    start = time.perf_counter(); one_pass(); seconds.append(time.perf_counter() - start)
print(json.dumps(statistics.median(seconds) / len(range(0, len(cache), batch_size))))
"""


def _run(code: str, *args) -> str:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"a benchmark process failed:\n{result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _git_head(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)
    return result.stdout.strip() or "?"


def report(record: dict) -> str:
    """The markdown table of one A/B record (what ``read-ab.json`` holds)."""
    args = record["args"]
    batch, vocab = int(args["batch"]), int(args["vocab"])
    lines = [f"# Streaming-read A/B: {record['candidate']} vs {record['baseline']}", "",
             f"{record['started']}; {args['rows']} x {vocab} fp16 cache written by the "
             f"baseline, batch {batch} ({batch * vocab * 2 / 1e6:.1f} MB per slice); "
             f"{args['rounds']} rounds, sides alternating, each a fresh process: median of "
             f"{args['passes']} passes after 2 warm-up passes. Times per batch: median over "
             f"rounds (min-max); the paired ratio is candidate / baseline within a round "
             f"(median and quartiles).", "",
             "| pattern | baseline | candidate | ratio of medians | paired ratio |",
             "|---|---|---|---|---|"]
    for pattern, result in record["patterns"].items():
        rounds, medians = result["rounds_s"], result["median_s"]
        cells = [f"{medians[side] * 1e6:.0f} us ({min(rounds[side]) * 1e6:.0f}-"
                 f"{max(rounds[side]) * 1e6:.0f})" for side in ("baseline", "candidate")]
        paired = [new / old for old, new in zip(rounds["baseline"], rounds["candidate"])]
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        lines.append(f"| {pattern} | {cells[0]} | {cells[1]} | "
                     f"{medians['candidate'] / medians['baseline']:.3f} | "
                     f"{statistics.median(paired):.3f} ({quartiles[0]:.3f}-{quartiles[2]:.3f}) |")
    env = record["environment"]
    load = env["load_average_1_5_15_min"]
    lines += ["", f"Machine: {env['cpu_model']}, {env['cpu_count']} CPUs, {env['platform']}, "
              f"torch {env['torch']}, Python {env['python']}; load average at the end "
              f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout to compare with")
    parser.add_argument("--candidate", type=Path, default=REPO, help="default: this checkout")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--patterns", nargs="+", default=["sequential", "gather"],
                        choices=["sequential", "gather"])
    parser.add_argument("--out", type=Path, help="folder for read-ab.md and read-ab.json")
    parser.add_argument("--render", type=Path, help="re-render a read-ab.json (no timing)")
    args = parser.parse_args(argv)
    if args.render:
        print(report(json.loads(args.render.read_text())), end="")
        return 0
    if args.baseline is None:
        parser.error("--baseline is required (or --render)")
    sides = {"baseline": args.baseline.resolve(), "candidate": args.candidate.resolve()}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(scratch) / "cache"
        _run(WRITE, sides["baseline"], REPO, cache_dir, args.rows, args.vocab)
        seconds = {pattern: {side: [] for side in sides} for pattern in args.patterns}
        for round_number in range(args.rounds):
            order = list(sides) if round_number % 2 == 0 else list(sides)[::-1]
            for pattern in args.patterns:
                for side in order:
                    seconds[pattern][side].append(float(_run(
                        READ, sides[side], REPO, cache_dir, args.batch, args.passes, pattern)))
            print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr)
    summary = {pattern: {"median_s": {side: statistics.median(values)
                                      for side, values in by_side.items()},
                         "rounds_s": by_side}
               for pattern, by_side in seconds.items()}
    record = {"started": started, "baseline": _git_head(sides["baseline"]),
              "candidate": _git_head(sides["candidate"]),
              "args": {key: str(value) for key, value in vars(args).items()},
              "patterns": summary, "environment": capture_environment(measure_cpu_bandwidth=False)}
    text = report(record)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "read-ab.md").write_text(text)
        (args.out / "read-ab.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
