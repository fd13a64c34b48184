"""The `tandem` command: one subcommand per module, each with `add_parser` and `run`.

Exit codes: 0 success, 1 a check failed (parity mismatch, regression), 2 bad input (suite,
config, file), 3 an engine or rank failure. Bad input never ends in a Python traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that implements it (imported only when used, so `tandem --help`
# stays fast and a missing optional dependency only affects its own command)
COMMANDS = {
    "run": "harness.cmd_run",
    "parity": "harness.parity",
    "bench": "harness.bench",
    "report": "reports.cli",
    "schedule": "harness.schedule_cli",
    "env": "harness.envinfo",
    "peak": "harness.envinfo",
    "regress": "harness.regress",
    "train": "harness.train",
    "simulate": "harness.simulate_cli",
}

HELP = {
    "run": "the main job: parity (smoke) + bench + report, on built-in defaults",
    "parity": "prove the engine computes what JAX computes, tensor by tensor",
    "bench": "engine vs JAX throughput, MFU, bubble and memory, side by side",
    "report": "render results directories into HTML + Markdown with figures",
    "schedule": "print a pipeline schedule, its bubble and in-flight micro-batches",
    "env": "print machine, versions and datasheet peaks",
    "peak": "measure this machine's fp32 GEMM peak (bf16 too on a GPU)",
    "regress": "benchmark two commits with asv and fail on a gated slowdown",
    "train": "train the engine for N steps: checkpoints, resume, a NaN/inf guard",
    "simulate": "project one training step onto a large cluster (validated on measured runs)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem: a pipeline-parallel C training engine held to account against JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.set_defaults(_module=module_name, _name=name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # keep the other commands usable
            p.set_defaults(_import_error=str(exc))
            continue
        adder = getattr(module, f"add_parser_{name}", None) or getattr(module, "add_parser")
        adder(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None):
        print(f"tandem {args.command}: unavailable: {args._import_error}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    runner = getattr(module, f"run_{args._name}", None) or getattr(module, "run")
    if args._name == "parity":  # JAX's compiles persist between parity runs (harness.jaxcache)
        from harness import jaxcache

        jaxcache.enable()
    from harness.errors import TandemError

    try:
        return int(runner(args) or 0)
    except TandemError as exc:
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tandem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
