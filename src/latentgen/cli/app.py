"""The Typer app and the CLI's error protocol: a LatentgenError becomes one line on stderr and exit 2; any other
exception is a bug, reported as one `internal error` line with where it happened, exit 70."""

from __future__ import annotations

import sys

import typer

from ..errors import LatentgenError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's help rendering costs more than the 0.3 s start-up budget
    help="Latent diffusion from the shell: generate, encode, decode, inspect and train LDM / Stable Diffusion models.",
)


EXIT_USAGE = 2
EXIT_INTERNAL = 70  # an unexpected exception: a bug in latentgen (sysexits' EX_SOFTWARE)
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt: what is in flight unwinds (temporary files
    are removed) and the process exits 143."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def internal_error(e: BaseException) -> None:
    """One line naming the exception and where: the innermost frame in latentgen (else the innermost one);
    LATENTGEN_DEBUG=1 prints the traceback first."""
    import os
    import traceback

    if os.environ.get("LATENTGEN_DEBUG") == "1":
        traceback.print_exception(e, file=sys.stderr)
    tb = traceback.extract_tb(e.__traceback__)
    where = ""
    if tb:
        ours = [f for f in tb if "/latentgen/" in f.filename.replace(os.sep, "/")]
        frame = (ours or tb)[-1]
        parts = frame.filename.replace(os.sep, "/").split("/latentgen/")
        where = f" at {parts[-1] if len(parts) > 1 else frame.filename}:{frame.lineno} in {frame.name}"
    msg = str(e).splitlines()[0] if str(e) else ""
    print(
        f"latentgen: internal error: {type(e).__name__}{': ' + msg if msg else ''}{where} "
        "(a bug: please report it; LATENTGEN_DEBUG=1 shows the traceback)",
        file=sys.stderr,
    )
    raise SystemExit(EXIT_INTERNAL)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one line on stderr and exit."""
    print(f"latentgen: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"latentgen: {message}", file=sys.stderr)


def guarded(fn):
    """Run a command with the CLI's error protocol: a LatentgenError becomes one line on stderr and exit 2;
    a closed stdout (`| head`) exits 1 quietly; Ctrl-C exits 130, SIGTERM 143 (training installs its own
    handlers, which checkpoint first); any other exception is an internal error, exit 70. Typer reads the
    wrapped signature."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import signal
        import threading
        import warnings

        warnings.showwarning = _warning_as_note
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGTERM) if main else None
        if before == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except LatentgenError as e:  # a full disk is no usage error: exit 1
            fail(str(e), 1 if getattr(e, "fatal", False) else EXIT_USAGE)
        except BrokenPipeError:
            sys.stderr.close()
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("latentgen: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Terminated:
            print("latentgen: terminated (SIGTERM): the image in progress was discarded", file=sys.stderr)
            raise SystemExit(EXIT_TERMINATED) from None
        except Exception as e:  # everything expected is a LatentgenError: this is a bug
            internal_error(e)
        finally:
            if before == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, before)

    return run


def _warning_as_note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"latentgen: warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def command(name: str | None = None):
    """`@command()` with the error protocol of `guarded`."""

    def register(fn):
        app.command(name)(guarded(fn))
        return fn

    return register


def main() -> None:
    """The `latentgen` console script: every command already turns errors into one line + exit 2."""
    guarded(app)()
