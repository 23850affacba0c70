"""`fag-tvm` command line (one entry point, `--help` on every subcommand).

User errors print one clear line on stderr and exit with status 2 (`--debug` shows the traceback);
Ctrl-C exits 130; a closed output pipe (`fag-tvm info --json | head`) ends quietly."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import bench, cache, compile, explore, info, inspect, quickstart, tune

ENVIRONMENT = """environment variables:
  FAG_TVM_CACHE            kernel cache folder (default ~/.cache/fag_tvm)
  FAG_TVM_TUNING_LOGS      tuning log root (default tuning_logs/ of the checkout)
  FAG_TVM_MCPU             CPU model for the llvm target instead of the detected one (must be a known LLVM
                           CPU name, e.g. znver4, skylake-avx512, haswell, x86-64)
  FAG_TVM_TUNING_ANY_CPU   1: apply tuning records measured on another CPU model
  FAG_TVM_TUNE_VERBOSE     1: show meta-schedule's own logs while tuning
  FAG_TVM_RUNTIME_LIB      path of libtvm_runtime.so (found in the tvm wheel by default)
  FAG_TVM_QUIET            1: no "compiling ..." notices on stderr
  FAG_TVM_NATIVE           0: the torch op without its native (C++ autograd) path
  TVM_NUM_THREADS          kernel threads (fag_tvm sets it to all usable cores)"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage is one `--help` away), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = _Parser(prog="fag-tvm", description="CANN-exact flash-attention backward compiled with TVM",
                                epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fag-tvm {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    for m in (info, quickstart, compile, bench, tune, explore, cache, inspect):
        m.add(sub)
    return p


def _fail(msg: str, code: int) -> int:
    print(f"fag-tvm: error: {msg}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    from ..errors import FagError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    interrupted = []

    def on_sigint(signum, frame):
        # TVM's FFI may turn the KeyboardInterrupt raised inside a callback into a RuntimeError: remember
        # that the user pressed Ctrl-C so whatever surfaces is reported as an interruption
        interrupted.append(True)
        raise KeyboardInterrupt

    if sys.stdin is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        args = build_parser().parse_args(argv)
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("fag-tvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): silence the flush at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except FagError as e:
        if debug:
            raise
        return _fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - environment errors exit 2, anything else is a bug: one line each
        if debug:
            raise
        if interrupted:
            print("fag-tvm: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, (OSError, ValueError, RuntimeError, TimeoutError)):
            return _fail(f"{type(e).__name__}: {e}", 2)
        return _fail(f"internal error {type(e).__name__}: {e} (run with --debug for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
