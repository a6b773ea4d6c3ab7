"""Turn a pytest-benchmark JSON of this suite into results: JSON records, a markdown table with
goal/met/missed columns, and PNG plots (time and GB/s against V per provider; matplotlib optional).
"""
import json
import math
from collections import defaultdict
from pathlib import Path

from benchmarks.presets import CPU_TARGET, SMALL_V_TARGETS

PROVIDER_ORDER = ("fastkd", "eager", "compile", "liger", "densify", "topk-eager", "topk-compile")


# ----------------------------------------------------------------------------- records
def load_records(pytest_json: dict) -> list:
    """One flat record per benchmark: the test's extra_info plus the timing statistics."""
    records = []
    for bench in pytest_json.get("benchmarks", []):
        stats = bench["stats"]
        records.append({**bench["extra_info"], "name": bench["name"], "group": bench["group"],
                        "median_s": stats["median"], "iqr_s": stats["iqr"],
                        "min_s": stats["min"], "max_s": stats["max"], "rounds": stats["rounds"]})
    return records


def loss_records(records):
    return [r for r in records if r.get("kind") == "loss"]


def _by_case(records):
    cases = defaultdict(dict)
    for record in loss_records(records):
        cases[record["case"]["id"]][record["provider"]] = record
    return cases


# ----------------------------------------------------------------------------- goals
def _at_least(name, measured, target, unit="x", detail=""):
    if measured is None:
        return {"goal": name, "target": f">= {target:g}{unit}", "measured": "not measured",
                "status": "not measured", "detail": detail}
    met = measured >= target
    status = "met" if met else f"missed by {target / measured:.2f}x" if unit == "x" \
        else f"missed by {target - measured:.1f}" + (" percentage points" if unit == "%" else unit)
    return {"goal": name, "target": f">= {target:g}{unit}", "measured": f"{measured:.2f}{unit}",
            "status": status, "detail": detail}


def _at_most(name, measured, target, unit, detail=""):
    if measured is None:
        return {"goal": name, "target": f"<= {target:g}{unit}", "measured": "not measured",
                "status": "not measured", "detail": detail}
    # enough digits that a miss never reads "missed by 0.00"
    digits = 2 if measured <= target or measured - target >= 0.005 else 3
    excess = f"{measured - target:.{digits}f}" + (" percentage points" if unit == "%" else unit)
    status = "met" if measured <= target else f"missed by {excess}"
    return {"goal": name, "target": f"<= {target:g}{unit}",
            "measured": f"{measured:.{digits}f}{unit}", "status": status, "detail": detail}


def _speedup(providers, baseline, statistic="median_s"):
    """baseline time / fastkd time (by median; ``statistic="min_s"`` for the best rounds)."""
    if "fastkd" not in providers or baseline not in providers:
        return None
    return providers[baseline][statistic] / providers["fastkd"][statistic]


def _min_detail(providers, baseline):
    ratio = _speedup(providers, baseline, "min_s")
    return "" if ratio is None else f"by min times: {ratio:.2f}x"


def _buffers(record):
    return record.get("peak_extra_buffers") if record else None


def _kernel_detail(record) -> str:
    """The CPU records' C kernel row buffers, which their peak counts beside torch's allocator."""
    if not record or "kernel_work_bytes" not in record:
        return ""
    return f"of which C kernel row buffers: {record['kernel_work_bytes'] / 2**20:.2f} MiB"


def sparse_goals(cases) -> list:
    """The goals of every sparse-teacher fwd+bwd case: fastkd >= 3x the densified path,
    >= 2x the compiled plain top-k loss, extra peak memory <= 1.1 student-logits buffers
    (cases with the gradient in place: the densified path, with its gradient in place too)."""
    goals = []
    for case_id, providers in sorted(cases.items()):
        case = next(iter(providers.values()))["case"]
        if not case.get("teacher_k") or case["mode"] != "fwd+bwd":
            continue
        inplace = case.get("grad_inplace", False)
        label = (f"sparse top-{case['teacher_k']} {case['rows']}x{case['vocab']} {case['dtypes']}"
                 + (", gradient in place" if inplace else ""))
        baselines = (("densify", 3),) if inplace else (("densify", 3), ("topk-compile", 2))
        for baseline, factor in baselines:
            goals.append(_at_least(f"{label}: fastkd vs {baseline}",
                                   _speedup(providers, baseline), factor,
                                   detail=_min_detail(providers, baseline)))
        densify = _buffers(providers.get("densify"))
        details = [_kernel_detail(providers.get("fastkd")),
                   "" if densify is None else f"densify: {densify:.2f} buffers"]
        goals.append(_at_most(f"{label}: fastkd extra peak memory",
                              _buffers(providers.get("fastkd")), 1.1, " buffers",
                              detail="; ".join(filter(None, details))))
    return goals


def evaluate_goals(records, device: str) -> list:
    """The goals (benchmarks/README.md) that these records can speak to, each met or missed by
    how much."""
    goals = []
    cases = _by_case(records)
    goals += sparse_goals(cases)
    cases = {case_id: providers for case_id, providers in cases.items()
             if not next(iter(providers.values()))["case"].get("teacher_k")}
    if device == "cpu":
        target = cases.get(CPU_TARGET.id, {})
        label = "CPU 2048x32000 fp32 fwd+bwd"
        goals.append(_at_least(f"{label}: fastkd vs eager composition", _speedup(target, "eager"),
                               6, detail=_min_detail(target, "eager")))
        goals.append(_at_least(f"{label}: fastkd vs torch.compile", _speedup(target, "compile"),
                               1.1, detail=_min_detail(target, "compile")))
        goals.append(_at_most(f"{label}: fastkd extra peak memory", _buffers(target.get("fastkd")),
                              1.05, " buffers", detail=_kernel_detail(target.get("fastkd"))))
        for case in SMALL_V_TARGETS:
            providers = cases.get(case.id, {})
            label = f"CPU small V {case.rows}x{case.vocab} fp32 fwd+bwd"
            goals.append(_at_least(f"{label}: fastkd vs eager composition",
                                   _speedup(providers, "eager"), 1.5,
                                   detail=_min_detail(providers, "eager")))
            goals.append(_at_least(f"{label}: fastkd vs torch.compile (no slower)",
                                   _speedup(providers, "compile"), 1.0,
                                   detail=_min_detail(providers, "compile")))
    else:
        for case_id, providers in sorted(cases.items()):
            case = next(iter(providers.values()))["case"]
            if not (case["vocab"] >= 32000 and case["student_dtype"] == "bf16"
                    and case["mode"] == "fwd+bwd"):
                continue
            label = f"GPU {case['rows']}x{case['vocab']} {case['dtypes']} fwd+bwd"
            fastkd = providers.get("fastkd")
            goals.append(_at_least(f"{label}: fastkd % of peak HBM bandwidth",
                                   fastkd and fastkd["pct_of_peak"], 85, "%"))
            for baseline, factor in (("eager", 4), ("compile", 1.5), ("liger", 2)):
                goals.append(_at_least(f"{label}: fastkd vs {baseline}",
                                       _speedup(providers, baseline), factor,
                                       detail=_min_detail(providers, baseline)))
            goals.append(_at_most(f"{label}: fastkd extra peak memory", _buffers(fastkd), 1.0,
                                  " buffers"))
    startup = {r["metric"]: r for r in records if r.get("kind") == "startup"}
    first = startup.get("first_call")
    goals.append(_at_most("first kd_loss call in a fresh process, beyond `import torch`",
                          first["seconds"] if first else None, 0.2, " s",
                          detail="" if not first else (
                              "imports torch._dynamo/inductor/sympy"
                              if first["compiler_stack_imported"] else
                              "no torch._dynamo/inductor/sympy imported")))
    cli = {label: startup[metric] for label, metric in
           (("--help", "cli_help"), ("argument error", "cli_argument_error")) if metric in startup}
    goals.append({"goal": "`fastkd --help` and argument errors without importing torch",
                  "target": "torch not imported",
                  "measured": "; ".join(
                      f"{label}: {'torch imported' if r['torch_imported'] else 'torch not imported'}"
                      f", {r['seconds'] * 1e3:.0f} ms" for label, r in cli.items()) or
                  "not measured",
                  "status": "not measured" if not cli else (
                      "missed" if any(r["torch_imported"] for r in cli.values()) else "met"),
                  "detail": "" if len(cli) != 1 else f"only {next(iter(cli))} measured"})
    syncs = startup.get("host_syncs")
    if syncs is not None:
        goals.append(_at_most("host syncs per kd_loss step (CUDA, Triton, default options)",
                              syncs["default"], 1, "",
                              detail=f"validate_labels=False: {syncs['sync_free']}"))
    cache = {r["metric"]: r for r in records if r.get("kind") == "cache"}
    write = cache.get("write")
    goals.append(_at_most("cache write: added to the teacher's forward time",
                          write and write["overhead_pct"], 5, "%"))
    for metric, label in (("read_sequential", "sequential slices"), ("read_gather", "random gathers")):
        read = cache.get(metric)
        goals.append(_at_least(f"cache read from the page cache: {label}",
                               read and read["gbps"], 2, " GB/s"))
    cached, online = cache.get("train_cached"), cache.get("train_online")
    ratio = cached["steps_per_s"] / online["steps_per_s"] if cached and online else None
    cost = online.get("teacher_to_student_cost") if online else None
    detail = f"teacher forward costs {cost:.1f}x the student step" if cost else ""
    if cost is not None and cost < 3:
        detail += " (< 3x: the goal's condition does not hold)"
    goals.append(_at_least("cached-teacher training steps/s vs online teacher", ratio, 2,
                           detail=detail))
    top_k = cache.get("bytes_top_k")
    if top_k:
        goals.append(_at_most(f"cache bytes per token: top-{top_k['k']} at V={top_k['vocab']} "
                              f"(teacher arrays)", top_k["teacher_bytes_per_token"], 132, " B",
                              detail=f"{top_k['bytes_per_token']:.1f} B with labels and all files"))
    return goals


# ----------------------------------------------------------------------------- markdown
def _ms(seconds):
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _number(value, digits=1):
    if value is None:
        return "-"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def loss_table(records) -> str:
    rows = []
    for case_id, providers in _by_case(records).items():
        for provider in sorted(providers, key=PROVIDER_ORDER.index):
            r = providers[provider]
            case = r["case"]
            speedup = _speedup(providers, provider) if provider != "fastkd" else None
            buffers = r.get("peak_extra_buffers")
            work = r.get("kernel_work_bytes")
            rows.append([
                case["group"], f"{case['rows']}x{case['vocab']}"
                + (f" top-{case['teacher_k']}" if case.get("teacher_k") else ""),
                case["dtypes"], case["mode"] + (", grad in place" if case.get("grad_inplace")
                                                else ""),
                provider, _ms(r["median_s"]), _ms(r["iqr_s"]), _ms(r["min_s"]), r["rounds"],
                _number(r["rows_per_s"]),
                f"{r['achieved_gbps']:.2f}", f"{r['pct_of_peak']:.1f}",
                "-" if buffers is None else f"{buffers:.2f}",
                "-" if work is None else f"{work / 2**20:.2f}",
                "-" if speedup is None else f"{speedup:.2f}x",
                "ok" if r["check"]["ok"] else "**WRONG**"])
    header = ["group", "N x V", "dtypes", "mode", "provider", "median ms", "IQR ms", "min ms",
              "rounds", "rows/s",
              "GB/s", "% peak", "extra mem (buffers)", "of which C kernel (MiB)",
              "fastkd speedup", "vs float64"]
    return _table(header, rows)


def cache_table(records) -> str:
    rows = []
    for r in (r for r in records if r.get("kind") == "cache"):
        metric = r["metric"]
        if metric == "write":
            figures = (f"{_number(r['rows_per_s'])} rows/s, {r['mb_per_s']:.3g} MB/s; bare pass "
                       f"(the teacher over the loader) {_ms(r['teacher_forward_s'])} ms, write pass "
                       f"{_ms(r['median_s'])} ms; the writer adds {_ms(r['added_s'])} ms besides "
                       f"the teacher's forward: {r['overhead_pct']:+.1f}%")
        elif metric.startswith("bytes"):
            dense = next((d for d in records if d.get("metric") == "bytes_dense"), None)
            figures = (f"{r['bytes_per_token']:,.1f} B/token in all files (teacher "
                       f"{r['teacher_bytes_per_token']:,} + labels {r['label_bytes_per_token']:g})")
            if dense and metric != "bytes_dense":
                figures += f", {dense['bytes_per_token'] / r['bytes_per_token']:,.0f}x " \
                           f"smaller than dense fp16"
        elif metric.startswith("read"):
            figures = f"{r['gbps']:.2f} GB/s ({_number(r['rows_per_s'])} rows/s)"
        else:
            figures = f"{r['steps_per_s']:.2f} steps/s"
            if "teacher_to_student_cost" in r:
                figures += f" (teacher forward = {r['teacher_to_student_cost']:.1f}x student step)"
        rows.append([metric, r["workload"], _ms(r["median_s"]), _ms(r["iqr_s"]), figures])
    return _table(["metric", "workload", "median ms", "IQR ms", "figures"], rows)


def startup_table(records) -> str:
    rows = []
    for r in (r for r in records if r.get("kind") == "startup"):
        if r["metric"] == "first_call":
            figures = (f"first kd_loss fwd+bwd {r['seconds'] * 1e3:.0f} ms beyond `import torch` "
                       f"({r['import_torch_seconds']:.2f} s); {r['new_modules']} modules loaded; "
                       f"compiler stack imported: {r['compiler_stack_imported']}")
        elif r["metric"] == "cli_help":
            figures = (f"`fastkd --help` {r['seconds'] * 1e3:.0f} ms; torch imported: "
                       f"{r['torch_imported']}")
        elif r["metric"] == "cli_argument_error":
            figures = (f"`fastkd cache` without `--out` (argument error) "
                       f"{r['seconds'] * 1e3:.0f} ms; torch imported: {r['torch_imported']}")
        else:
            figures = (f"per step: {r['default']} (default), {r['sync_free']} "
                       f"(validate_labels=False), {r['no_labels']} (labels=None)")
        rows.append([r["metric"], figures])
    return _table(["metric", "figures"], rows)


def kernel_table(records) -> str:
    rows = [[r["module"].rsplit(".", 1)[-1], r["name"], r["arch"], r["num_warps"],
             "compile error" if "error" in r else r["registers"],
             "-" if "error" in r else f"{r['spill_store_bytes']}/{r['spill_load_bytes']}",
             "-" if "error" in r else r["shared_bytes"]] for r in records]
    return _table(["kernels", "specialization", "arch", "warps", "registers/thread",
                   "spill bytes store/load", "shared bytes"], rows)


def goals_table(goals) -> str:
    return _table(["goal", "target", "measured", "status", "note"],
                  [[g["goal"], g["target"], g["measured"], g["status"], g["detail"]] for g in goals])


def _load(values):
    return "/".join(f"{value:.1f}" for value in values) if values else "?"


def environment_lines(env: dict) -> str:
    gpu = env.get("gpu") or {}
    lines = [f"- when: {env['timestamp_utc']}; git {env['git']['commit']}"
             f"{' (uncommitted changes present)' if env['git']['dirty'] else ''}",
             f"- CPU: {env['cpu_model']}, {env['cpu_count']} logical CPUs, torch threads "
             f"{env['torch_threads']}; load average (1/5/15 min) at the start "
             f"{_load(env.get('load_average_1_5_15_min'))}, at the end "
             f"{_load(env.get('load_average_at_end_1_5_15_min'))}",
             f"- versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"fastkd {env['fastkd']}, liger-kernel {env['liger_kernel']}"]
    if gpu:
        lines.append("- GPU: " + ", ".join(f"{key} {value}" for key, value in gpu.items()))
    pages = env.get("cpu_huge_pages")
    if pages and env["bench_device"] == "cpu":
        lines.append(f"- CPU huge pages: kernel transparent_hugepage {pages['kernel_thp']}, "
                     f"THP_MEM_ALLOC_ENABLE={pages['THP_MEM_ALLOC_ENABLE'] or 'unset'}")
    bandwidth = env.get("cpu_copy_bandwidth")
    if bandwidth:
        lines.append(f"- CPU copy bandwidth: {bandwidth['peak_bandwidth_gbps']:.1f} GB/s peak, "
                     f"{bandwidth['median_bandwidth_gbps']:.1f} GB/s median ({bandwidth['method']})")
    if env["bench_device"] == "cuda":
        source = ("a measured device copy (NVML gave no clock/bus width)"
                  if env.get("cuda_copy_bandwidth") else "NVML max memory clock x bus width x 2")
    else:
        source = "the CPU copy bandwidth above"
    lines.append(f"- % of peak uses {env['peak_bandwidth_gbps']:.1f} GB/s ({source})")
    return "\n".join(lines)


def markdown(records, env: dict, preset: str, goals: list, plots=()) -> str:
    parts = [f"# fastkd benchmark results: preset `{preset}` on {env['bench_device']}",
             "", environment_lines(env), "",
             "Byte count: forward+backward moves `N*V*(s + t + s)` bytes (read student and teacher "
             "once, write the gradient once), forward-only `N*V*(s + t)`, with `s`, `t` the "
             "student/teacher element sizes. GB/s = bytes / median time. Extra memory is the peak "
             "during one warm call minus the inputs, in student-logits-sized buffers "
             "(the gradient counts; CPU: torch's allocator peak plus the C kernels' row "
             "buffers, benchmarks/memory.py). Loss = 0.5 * T^2 * KL(p_t || p_s) + 0.5 * CE, T = 2.",
             "", "## Goals", "", goals_table(goals), ""]
    if loss_records(records):
        parts += ["## Loss", "", loss_table(records), ""]
    if any(r.get("kind") == "cache" for r in records):
        parts += ["## Cache", "", cache_table(records), ""]
    if any(r.get("kind") == "startup" for r in records):
        parts += ["## Start-up and host syncs", "", startup_table(records), ""]
    kernels = env.get("kernel_resources")
    if kernels:
        parts += ["## Kernel resources (ahead-of-time compile, ptxas -v)", "",
                  kernel_table(kernels), ""]
    for plot in plots:
        parts += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plots
def plot_sweeps(records, out_dir: Path) -> list:
    """time_vs_V.png and gbps_vs_V.png: one panel per (dtypes, mode) of the sweep group."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fastkd[plot]'): no plots written")
        return []
    panels = defaultdict(lambda: defaultdict(list))
    for r in loss_records(records):
        case = r["case"]
        if case["group"] == "sweep":
            panels[(case["dtypes"], case["mode"], case["rows"])][r["provider"]].append(r)
    # a panel needs at least two vocabulary sizes to draw a line; single points are in the table
    panels = {key: lines for key, lines in panels.items()
              if len({r["case"]["vocab"] for rs in lines.values() for r in rs}) >= 2}
    if not panels:
        return []
    written = []
    for metric, ylabel, filename in (("median_s", "median time (ms)", "time_vs_V.png"),
                                     ("achieved_gbps", "achieved GB/s (byte-count floor)",
                                      "gbps_vs_V.png")):
        keys = sorted(panels, key=lambda key: (key[0] != "fp32", key[1] != "fwd+bwd", key))
        columns = min(3, len(keys))
        rows = math.ceil(len(keys) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
        for axis, key in zip(axes.flat, keys):
            for provider in sorted(panels[key], key=PROVIDER_ORDER.index):
                points = sorted(panels[key][provider], key=lambda r: r["case"]["vocab"])
                values = [r[metric] * (1e3 if metric == "median_s" else 1) for r in points]
                axis.plot([r["case"]["vocab"] for r in points], values, marker="o", label=provider)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_title(f"{key[0]} {key[1]}, {key[2]} rows")
            axis.set_xlabel("V (vocabulary)")
            axis.set_ylabel(ylabel)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
        for axis in list(axes.flat)[len(keys):]:
            axis.set_visible(False)
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_results(pytest_json: dict, out_dir: Path) -> dict:
    """results.json, results.md and the plots under ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = pytest_json.get("fastkd") or {}
    env, preset = meta.get("environment"), meta.get("preset", "?")
    if env is None:
        raise ValueError("the pytest-benchmark JSON has no fastkd environment (no benchmark ran?)")
    records = load_records(pytest_json)
    goals = evaluate_goals(records, env["bench_device"])
    plots = plot_sweeps(records, out_dir)
    (out_dir / "results.json").write_text(json.dumps(
        {"preset": preset, "environment": env, "goals": goals, "records": records}, indent=1))
    (out_dir / "results.md").write_text(markdown(records, env, preset, goals, plots))
    return {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plots": plots}
