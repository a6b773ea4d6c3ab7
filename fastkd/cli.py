"""The `fastkd` command line: each sub-command's module registers it with
``add_parser(subparsers)``. Only the named command's module is imported, and argument parsing
never imports torch (``fastkd --help`` uses the one-line help below).
"""
import argparse
import importlib
import sys

# command -> (module exposing add_parser(subparsers), which sets `func`; one-line help)
_COMMANDS = {
    "cache": ("fastkd.cache.commands",
              "run a teacher once over a dataset and cache its logits as fp16 shards"),
    "verify": ("fastkd.cache.commands", "check every cache file against its checksum"),
    "info": ("fastkd.cache.commands", "summarize a cache directory"),
    "import": ("fastkd.cache.commands",
               "turn a served teacher's top-k log-probs (vLLM JSONL) into a top-k cache"),
    "export": ("fastkd.cache.export", "write a cache's rows as parquet for `datasets` users"),
    "demo": ("fastkd.demo_cli",
             "train a digits teacher, cache its logits, distil a student, report"),
    "bench": ("fastkd.bench", "run the benchmark suite (source checkout only)"),
}


def _requested_command(argv):
    """The sub-command named on the command line (first non-option word), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word
        if word in ("-h", "--help", "--version"):
            return None
    return None


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; only the module of the command named in ``argv`` is imported (all of them
    when ``argv`` is None)."""
    from fastkd import __version__
    parser = argparse.ArgumentParser(
        prog="fastkd", description="Fused knowledge-distillation losses and teacher-logit caching.")
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _requested_command(argv) if argv is not None else None
    for module_name in dict.fromkeys(module for module, _ in _COMMANDS.values()):
        if argv is not None and _COMMANDS.get(wanted, (None,))[0] != module_name:
            continue
        importlib.import_module(module_name).add_parser(subparsers)
    if argv is not None:
        for name, (_, help_text) in _COMMANDS.items():
            if name not in subparsers.choices:   # listed in --help, never run
                subparsers.add_parser(name, help=help_text)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from fastkd.extras import MissingExtraError
    try:
        result = args.func(args)
    except MissingExtraError as error:   # an optional package this command needs
        print(f"fastkd: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a one-line note instead of a traceback (status as for SIGINT)
        print("fastkd: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
