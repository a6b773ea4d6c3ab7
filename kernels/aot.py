"""Compile Triton kernel specializations ahead of time for real GPUs, without a GPU.

Triton's interpreter never runs the GPU compiler, so this compiles each kernel module's
``aot_specializations()`` to a cubin (with Triton's ptxas) per target and reports registers per
thread, spill bytes and shared memory; ``python -m fastkd.kernels.aot [--json out.json]``. Run it
as a subprocess with ``TRITON_INTERPRET`` unset (``@triton.jit`` reads it at import).
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# Kernel families compiled ahead of time: one line per module exposing aot_specializations().
AOT_MODULES = [
    "fastkd.kernels.kd_loss",
    "fastkd.kernels.kd_sparse",
]
# (capability, name): A100 and H100
TARGETS = [(80, "sm_80"), (90, "sm_90")]

_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers per thread and spill bytes from ``ptxas -v`` on the compiled PTX, kept beside
    Triton's compile cache so an unchanged kernel's re-run is fast."""
    import hashlib
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton",
                                                              "cache")
    digest = hashlib.sha256(f"{capability}\0{ptx}".encode()).hexdigest()[:32]
    cached = os.path.join(root, "fastkd-ptxas", digest + ".json")
    if os.path.exists(cached):
        with open(cached) as handle:
            return json.load(handle)
    report = _run_ptxas(ptx, capability)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached + ".tmp", "w") as handle:
        json.dump(report, handle)
    os.replace(cached + ".tmp", cached)
    return report


def _run_ptxas(ptx: str, capability: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", source, "-o",
             os.path.join(scratch, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    used = _USED.search(log)
    spills = _SPILLS.search(log)
    return {"registers": int(used.group(1)) if used else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


def compile_spec(spec: dict, capability: int) -> dict:
    """Compile one specialization for ``sm_<capability>``; returns a record (``error`` set
    instead of the figures when it does not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    record = {"kernel": spec["kernel"].__name__, "name": spec["name"],
              "arch": f"sm_{capability}", "num_warps": spec["num_warps"]}
    try:
        source = ASTSource(spec["kernel"], spec["signature"], constexprs=spec["constexprs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": spec["num_warps"]})
        record["shared_bytes"] = int(compiled.metadata.shared)
        record.update(_ptxas_report(compiled.asm["ptx"], capability))
    except Exception as error:  # reported per specialization, the caller decides
        record["error"] = f"{type(error).__name__}: {error}"[-3000:]
    return record


def compile_all(modules=None, targets=None):
    """Records for every specialization of every module and target."""
    records = []
    for module_name in modules or AOT_MODULES:
        module = importlib.import_module(module_name)
        for spec in module.aot_specializations():
            for capability, _ in targets or TARGETS:
                record = compile_spec(spec, capability)
                record["module"] = module_name
                records.append(record)
    return records


def format_table(records) -> str:
    lines = ["| module | specialization | arch | warps | registers/thread | spill bytes "
             "(store/load) | shared bytes |", "|---|---|---|---|---|---|---|"]
    for r in records:
        figures = "**compile error** | - | -" if "error" in r else \
            f"{r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | " \
            f"{r['shared_bytes']}"
        lines.append(f"| {r['module']} | {r['name']} | {r['arch']} | {r['num_warps']} | "
                     f"{figures} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the records to this JSON file")
    parser.add_argument("--module", action="append", help="only these modules (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    records = compile_all(args.module)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    print(format_table(records))
    failed = [r for r in records if "error" in r or r.get("spill_store_bytes")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
