"""``fastkd demo``: the whole product on real data, in a short CPU run.

1. Train a small CNN teacher (:class:`fastkd.models.DigitsTeacherCNN`) on the training split of
   scikit-learn's bundled digits (1797 8x8 images; fixed, stratified 75/25 split; no download).
2. Cache its logits over the training split with the real ``fastkd cache`` command (teacher
   spec ``fastkd.models:DigitsTeacherCNN`` + the saved checkpoint, fp16 shards).
3. Train a tiny student (:class:`fastkd.models.DigitsStudentCNN`) that sees the labels of only
   ``--label-fraction`` of the training images, twice with the same seed and batches:
   from scratch (cross-entropy on the labelled images) and distilled from the cache
   (``fastkd.kd_loss`` soft term on every image + the same cross-entropy).
4. Time ``fastkd.kd_loss`` against the textbook eager composition, forward + backward, at the
   demo's own batch shape and at a labelled large-vocabulary shape; the table says plainly
   where fastkd is not faster.
5. Print a table of held-out accuracies, cache size and loss throughput.
"""
import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastkd demo`` on the CLI's sub-parsers (imports neither torch nor
    :mod:`fastkd.demo`; :func:`run` does, once the arguments are valid)."""
    parser = subparsers.add_parser(
        "demo", help="train a digits teacher, cache its logits, distil a student, report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where models and the loss run (default: auto = cuda if present)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="training epochs for the teacher and for each student (default 20)")
    parser.add_argument("--out", default=None,
                        help="directory for the teacher checkpoint and logit cache "
                             "(default: a new temporary directory)")
    parser.add_argument("--label-fraction", type=float, default=0.1,
                        help="fraction of training images whose labels the students see "
                             "(default 0.1; 1.0 = plain supervised vs Hinton KD)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: a quarter of the training images, tiny benchmark")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """``fastkd demo`` with the parsed options: :func:`fastkd.demo.run_demo`, then its table.
    A bad option is a usage error (exit 2); an ``--out`` that cannot take the outputs or another
    environment problem is one ``fastkd: error:`` line (exit 1), as for ``fastkd cache``."""
    from fastkd.cache.commands import fail, fail_os
    from fastkd.demo import DemoError, format_table, run_demo
    try:
        results = run_demo(epochs=args.epochs, device=args.device, out_dir=args.out,
                           label_fraction=args.label_fraction, seed=args.seed, quick=args.quick,
                           progress=not args.quiet)
    except DemoError as error:
        # a failed `fastkd cache` step has printed its own line: the demo adds none
        return error.status if error.reported else fail(str(error))
    except ValueError as error:
        print(f"fastkd demo: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        return fail_os(error)
    print("\n" + format_table(results))
    return 0
