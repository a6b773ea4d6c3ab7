"""The `fastkd` command line. Each sub-command lives in the module that owns its feature and
registers itself through an ``add_parser(subparsers)`` function; this file only wires them up."""
import argparse
import importlib
import sys

# sub-command modules, each exposing add_parser(subparsers) that sets `func` on its parser
_COMMAND_MODULES = ("fastkd.cache.commands", "fastkd.cache.importer", "fastkd.demo", "fastkd.bench")


def build_parser() -> argparse.ArgumentParser:
    from fastkd import __version__
    parser = argparse.ArgumentParser(
        prog="fastkd", description="Fused knowledge-distillation losses and teacher-logit caching.")
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # feature not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:  # a one-line note instead of a traceback (status as for SIGINT)
        print("fastkd: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
