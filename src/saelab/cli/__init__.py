"""The `saelab` command. Each sub-command lives in its own module and is a thin wrapper over the library."""

from __future__ import annotations

import errno
import importlib
import re
import warnings
from typing import Any, NoReturn, Protocol, TypeGuard, cast

import typer

from saelab.errors import SaelabError

app = typer.Typer(
    name="saelab",
    help="Train, evaluate and diagnose sparse autoencoders against known ground truth.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its commands to `app`; importing here keeps start-up to what is used.
    from saelab.cli.options import hide_flag_types

    hide_flag_types()
    from saelab.cli import (  # noqa: F401
        bench,
        cache,  # noqa: F401
        compare,
        convert,
        diagnose,
        report,
        research,
        results,
        synth,
        train,
    )


# OSErrors that are the user's situation, not a bug: a full or read-only disk, a path that is a file
# or a folder where the other was needed, no permission, no such path.
USER_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.EDQUOT,
    errno.ELOOP,
}
_OOM_MARKERS = ("can't allocate memory", "out of memory", "not enough memory", "cannot allocate memory")


def _click_errors(name: str) -> tuple[type[BaseException], ...]:
    # Typer ≥ 0.20 raises its vendored copy of click's exceptions, older typer click's own: catch both.
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


class _ClickError(Protocol):
    """What saelab reads from a click exception (click's own, or typer ≥ 0.20's vendored copy)."""

    exit_code: int

    def format_message(self) -> str: ...


class _BadParameterError(_ClickError, Protocol):
    """click's BadParameter: the option it refused (`param`, a click Parameter or None) and why."""

    message: str
    param: Any
    ctx: Any


def _is_bad_parameter(err: object) -> TypeGuard[_BadParameterError]:
    return isinstance(err, _click_errors("BadParameter")) and not isinstance(err, _click_errors("MissingParameter"))


def _fail(message: str, code: int = 2) -> NoReturn:
    # One line whatever the message holds, so scripts can read it.
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise SystemExit(code) from None


def _bad_value(err: _BadParameterError, args: list[str]) -> str | None:
    """The command-line text click refused for `err.param`: the value that fails its conversion."""
    param = err.param
    if param is None:
        return None
    opts = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("-")]
    values = []
    for i, token in enumerate(args):
        if token in opts and i + 1 < len(args):
            values.append(args[i + 1])
        for opt in opts:
            if token.startswith(opt + "="):
                values.append(token[len(opt) + 1 :])
    if not values:
        return None
    convert = getattr(getattr(param, "type", None), "convert", None)  # click's params; typer ≥ 0.20 has none
    if convert is not None:
        for value in values:
            try:
                convert(value, param, err.ctx)
            except Exception:  # noqa: BLE001 (whatever the type raises, this is the refused value)
                return value
    if not getattr(param, "multiple", False) or len(values) == 1:
        return values[-1]  # a repeated single-value option keeps its last value
    return None


def _usage_message(err: _ClickError, args: list[str]) -> str:
    if _is_bad_parameter(err) and getattr(err, "param", None) is not None and err.param.name and err.message:
        value = _bad_value(err, args)
        field = err.param.name if value is None else f"{err.param.name}={value!r}"
        return f"{field}: {err.message}"
    return err.format_message()


def _oom_message(err: BaseException) -> str:
    text = str(err)
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        from saelab.memory import format_bytes

        text = f"could not allocate {format_bytes(int(m.group(1)))}"
    else:
        text = text.splitlines()[0][:200] if text else type(err).__name__
    return f"out of memory ({text}); lower --batch-size, --width or --samples"


def main(argv: list[str] | None = None) -> None:
    """Run the command line; every mistake ends as one `error: ...` line on stderr and exit status 2."""
    import sys

    from saelab.cli.commands import command_listing, lists_commands

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        target = app
        if lists_commands(args):  # `saelab`, `saelab --help`: the list of commands, without importing them (torch)
            from saelab.cli.options import hide_flag_types

            hide_flag_types()
            target = command_listing(app)
        else:
            from saelab.cli.common import expand_multi_value_args

            _register()
            # inside the try: a bad range such as `--l0 20..5` is a one-line error too
            args = expand_multi_value_args(args)
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of any .pt file it reads with weights_only=True; saelab
            # reports a file it cannot read itself, in one line, and the warning would be a second.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # standalone_mode=False: click's usage errors reach the handlers below instead of a multi-line panel
            result = target(args=args, prog_name="saelab", standalone_mode=False)
    except SaelabError as err:
        _fail(str(err), code=getattr(err, "exit_code", 2))  # 130/143 for a training stopped by SIGINT/SIGTERM
    except _click_errors("NoArgsIsHelpError") as err:
        from typer import rich_utils

        # The help text, as typer shows it. typer annotates the parameter with its vendored ClickException;
        # `err` is one (or click's own, which typer < 0.20 raises and expects), found at runtime by name.
        rich_utils.rich_format_error(err)  # pyright: ignore[reportArgumentType]
        raise SystemExit(cast(_ClickError, err).exit_code) from None
    except _click_errors("ClickException") as err:
        _fail(_usage_message(cast(_ClickError, err), args), code=getattr(err, "exit_code", 2))
    except (typer.Abort, *_click_errors("Abort")):
        _fail("aborted", code=1)
    except MemoryError as err:
        _fail(_oom_message(err))
    except RuntimeError as err:
        if any(marker in str(err).lower() for marker in _OOM_MARKERS):
            _fail(_oom_message(err))
        raise
    except OSError as err:
        # The last line of defence: commands check their paths first, but a disk can fill up mid-run.
        if err.errno in USER_ERRNOS:
            _fail(f"{err.strerror or err}: {err.filename}" if err.filename else f"{err.strerror or err}")
        raise
    raise SystemExit(result if isinstance(result, int) else 0)
