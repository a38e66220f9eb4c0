"""The command line every stage shares: `python -m jaxsft.<stage> --config=... --workdir=...`.

    --config=FILE[:ARG]   the experiment config (`configs/*.py`); `--config.a.b=value` overrides a field
    --workdir=DIR         the experiment (or run) directory, local or gs://
    --print_config        print the resolved, validated config and exit 0
    --verbose             show the traceback of an error too

The whole config is validated (`config.validate`) before anything is loaded. Exit status: 0 done;
2 a mistake the user can fix (a bad flag, a missing or failing config file, a misspelt or bad config
field, a bad data or model file, inputs that do not match), reported as ONE line on stderr,
`error: <what, where, what to do>`; 1 a bug, reported with its traceback. A stage may also return
its own status (`jaxsft.compile`: 1 when a step does not fit).

Library code raises `UserError` (jaxsft/errors.py) for a user's mistake; absl's flag errors and an
`OSError` (a missing input file, a permission, a hub that cannot be reached) count as such too.
Everything else is a bug.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from jaxsft import config as config_lib
from jaxsft.errors import UserError

__all__ = ["USAGE_ERROR", "Command", "Invocation", "UserError", "main", "run_main", "user_message"]

USAGE_ERROR = 2  # the exit status of a user's mistake; a bug exits 1
# A missing input, a permission, a full disk, a hub that cannot be reached: the environment, not a bug.
_INPUT_ERRORS = (OSError,)


@dataclasses.dataclass(frozen=True)
class Invocation:
    """What a stage gets: the validated config, --workdir, and the values of its own flags."""

    config: ml_collections.ConfigDict
    workdir: str | None
    flags: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Command:
    """One `python -m jaxsft.<stage>`.

    `run` does the work; an int it returns is the exit status (anything else means 0).
    `workdir` is the help of --workdir (None: the stage has no --workdir).
    `define(flag_values)` defines the stage's own flags; `required` names those that must be given.
    """

    run: Callable[[Invocation], Any]
    workdir: str | None = "experiment directory (local or gs://)"
    define: Callable[[flags.FlagValues], None] = lambda flag_values: None
    required: tuple[str, ...] = ()


def _define(command: Command, argv: Sequence[str], fv: flags.FlagValues) -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True, flag_values=fv, sys_argv=list(argv))
    if command.workdir is not None:
        flags.DEFINE_string("workdir", None, command.workdir, flag_values=fv)
    flags.DEFINE_boolean("print_config", False, "print the resolved config and exit", flag_values=fv)
    flags.DEFINE_boolean("verbose", False, "on an error, show its traceback too", flag_values=fv)
    for name in ("config", "workdir", "print_config", "verbose"):
        if name in fv:  # listed by --help with the stage's own flags (absl lists the main module's)
            fv.register_flag_by_module(sys.argv[0], fv[name])
    command.define(fv)
    required = ["config", *(["workdir"] if command.workdir is not None else []), *command.required]
    flags.mark_flags_as_required(required, flag_values=fv)


def _parse(command: Command, argv: Sequence[str], fv: flags.FlagValues) -> Invocation:
    """Define and parse the flags, load and validate the config."""
    _define(command, argv, fv)
    try:
        rest = fv(list(argv))
    except flags.Error:
        raise
    except Exception as e:  # raised by the config file itself, or by an override of a field it lacks
        raise _config_file_error(e, argv) from e
    if len(rest) > 1:
        raise UserError(f"unexpected argument {rest[1]!r}: every option is a --flag=value (see --help)")
    workdir = fv["workdir"].value if command.workdir is not None else None
    try:
        cfg = fv["config"].value
        if cfg is not None:
            cfg.keys()  # a config file that failed to load raises on first use
    except OSError as e:
        raise _config_file_error(e, argv) from e
    config_lib.validate(cfg)
    own = {name: fv[name].value for name in fv if name not in ("config", "workdir", "print_config", "verbose")
           and not name.startswith("config.")}
    return Invocation(cfg, workdir, own)


def _config_file_error(e: BaseException, argv: Sequence[str]) -> UserError:
    """One line for a config file that is missing, fails, or is overridden on a field it lacks."""
    given = [a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)]
    path = given[-1] if given else "?"
    if isinstance(e, OSError) and "Failed loading config file" in str(e):
        return UserError(f"--config={path}: no such config file; pass a config file such as configs/demo.py")
    overrides = [a.split("=", 1)[0].lstrip("-")[len("config."):] for a in argv if re.match(r"^--?config\.", a)]
    known = set(config_lib.field_names())
    sections = {name.split(".")[0] for name in known}
    unknown = [o for o in overrides if o not in known and o not in sections]
    if isinstance(e, (AttributeError, KeyError)) and unknown:
        try:
            config_lib.check_fields(_with_field(unknown[0]))
        except UserError as named:
            return UserError(f"--{named}")
    file = path.split(":")[0].lstrip("./")
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith(file)]
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else (frames[-1].lineno if frames else None)
    where = f"--config={path}" + (f" line {line}" if line else "")
    return UserError(f"{where}: the config file failed: {type(e).__name__}: {_last_line(str(e))}")


def _with_field(name: str) -> ml_collections.ConfigDict:
    """The default config with one more (unknown) field, to name it as `validate` does."""
    cfg = config_lib.default_config()
    *sections, leaf = name.split(".")
    node = cfg
    for section in sections:
        if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
            node[section] = ml_collections.ConfigDict()
        node = node[section]
    node[leaf] = 0
    return cfg


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_message(e: BaseException) -> str | None:
    """The one-line message of a user's mistake; None for a bug."""
    if isinstance(e, flags.Error):
        text = str(e)
        required = re.search(r"Flag --(\w+) must have a value other than None", text)
        if required:
            return f"--{required.group(1)} is required (see --help)"
        if isinstance(e, flags.UnrecognizedFlagError):
            if e.flagname.startswith("config."):  # overrides exist only once --config names a file
                return f"--{e.flagname} overrides a field of a config file: pass --config=<file> too"
            return f"--{e.flagname}: unknown flag; run with --help to list the flags"
        parsing = re.match(r"flag --config=(.*): Error whilst parsing config file:", text)
        if parsing:  # the config file raised TypeError/ValueError: name its line
            path = parsing.group(1).split(":", 1)[0]
            lines = re.findall(rf'File "([^"]*)", line (\d+)', text)
            line = next((n for f, n in reversed(lines) if f.endswith(path.lstrip("./"))), None)
            where = f"--config={parsing.group(1)}" + (f" line {line}" if line else "")
            return f"{where}: the config file failed: {_last_line(text)}"
        return _one_line(re.sub(r"^flag ", "", text))
    if isinstance(e, UserError):
        return _one_line(str(e))
    if isinstance(e, _INPUT_ERRORS):
        return _one_line(str(e))
    return None


def _report(e: BaseException, verbose: bool) -> int:
    """Print the error; its exit status."""
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    message = user_message(e)
    if message is None or verbose:
        traceback.print_exception(e, file=sys.stderr)
    if message is None:
        return 1
    print(f"error: {message}", file=sys.stderr, flush=True)
    return USAGE_ERROR


def _execute(command: Command, invocation: Invocation, print_config: bool) -> int:
    if print_config:
        print(invocation.config, end="", flush=True)
        return 0
    status = command.run(invocation)
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def _verbose(argv: Sequence[str]) -> bool:
    """--verbose from the raw arguments: it must count even when the flags fail to parse."""
    flag = [a for a in argv if re.match(r"^--?(no)?verbose(=|$)", a)]
    return bool(flag) and not flag[-1].lstrip("-").startswith("noverbose") and \
        flag[-1].split("=", 1)[-1].lower() not in ("false", "0")


def run_main(command: Command, argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> int:
    """Run `command` on `argv` (program name first) with its own flags; return the exit status."""
    fv = flags.FlagValues() if flag_values is None else flag_values
    try:
        invocation = _parse(command, argv, fv)
        return _execute(command, invocation, fv["print_config"].value)
    except BaseException as e:  # noqa: BLE001 -- every outcome becomes an exit status
        return _report(e, _verbose(argv))


def main(command: Command, argv: Sequence[str] | None = None) -> int | None:
    """`python -m jaxsft.<stage>`: absl's app (logging, --help) around `run_main`; exits with its status.

    With `argv` (program name first), run in this process on flags of its own and return the status
    instead (tests, notebooks)."""
    if argv is not None:
        return run_main(command, argv)
    from absl import app

    parsed: dict[str, Invocation] = {}

    def parse(argv: list[str]) -> list[str]:
        try:
            parsed["invocation"] = _parse(command, argv, flags.FLAGS)
        except BaseException as e:  # noqa: BLE001
            sys.exit(_report(e, _verbose(argv)))
        return argv

    def run(argv: list[str]) -> int:
        try:
            return _execute(command, parsed["invocation"], flags.FLAGS.print_config)
        except BaseException as e:  # noqa: BLE001
            return _report(e, _verbose(argv))

    app.run(run, flags_parser=parse)
