"""The Typer app and the CLI's error protocol: a LatentgenError becomes one line on stderr and exit 2."""

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


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one line on stderr and exit."""
    print(f"latentgen: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"latentgen: {message}", file=sys.stderr)


def guarded(fn):
    """Run a command with the CLI's error protocol: a LatentgenError becomes one line on stderr and exit 2;
    a closed stdout (`| head`) exits 1 quietly; Ctrl-C exits 130. Typer reads the wrapped signature."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import warnings

        warnings.showwarning = _warning_as_note
        try:
            return fn(*args, **kwargs)
        except LatentgenError as e:
            fail(str(e))
        except BrokenPipeError:
            sys.stderr.close()
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("latentgen: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

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
