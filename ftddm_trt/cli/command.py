"""The command classes every `ftddm-trt` command uses: old spellings of options and arguments translated
(with a deprecation message on stderr), expert options shown by ``--help-all``, commands grouped by panel.

A command declares its old spellings with ``spellings(...)`` as its ``cls``::

    @app.command("finetune", cls=spellings(options={"--from": "--model"}, positionals=("--data", "--out")))

``options``: old option -> new option. ``positionals``: the options that positional arguments beyond the
command's declared ones go to, in order (``finetune DATA OUT`` -> ``finetune --data DATA --out OUT``).
Giving the old and the new spelling of one option together is an error. Expert options are declared
``typer.Option(..., **EXPERT)``: hidden from ``--help``, listed by ``--help-all`` and in docs/cli.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import typer
import typer.core

from ftddm_trt.workflows.console import console

#: The version whose release drops the old spellings.
OLD_SPELLINGS_UNTIL = "0.3.0"
#: Panel of the expert options in `--help-all`.
EXPERT_PANEL = "Expert options"
#: ``typer.Option(..., **EXPERT)``: an option a first-time user never needs (shown by ``--help-all``).
EXPERT: dict[str, Any] = {"hidden": True, "rich_help_panel": EXPERT_PANEL}
#: The command panels of `ftddm-trt --help`, in order.
PANELS = ("Use", "Train", "Deploy", "Measure")


def deprecation(old: str, new: str) -> None:
    """One line on stderr: ``old`` is an old spelling of ``new``."""
    console.print(f"[yellow]deprecated:[/] {old} is an old spelling of {new}; it is accepted until "
                  f"ftddm-trt {OLD_SPELLINGS_UNTIL}", highlight=False)


def _show_all_help(ctx, _param, value: bool) -> None:
    """``--help-all``: the help with every option, expert ones included."""
    if value and not ctx.resilient_parsing:
        typer.echo(full_help(ctx), color=ctx.color)
        ctx.exit()


def full_help(ctx) -> str:
    """``ctx.command``'s help with its expert (hidden) options listed too, in their own section."""
    expert = [p for p in ctx.command.params if getattr(p, "hidden", False)]
    for p in expert:
        p.hidden = False
    ctx.meta[_EXPERT_KEY] = expert
    try:
        return ctx.get_help()
    finally:
        ctx.meta.pop(_EXPERT_KEY, None)
        for p in expert:
            p.hidden = True


_EXPERT_KEY = "ftddm_trt.expert_options"


class Command(typer.core.TyperCommand):
    """A typer command with old spellings translated and a ``--help-all`` option."""

    renamed: ClassVar[dict[str, str]] = {}
    positionals: ClassVar[tuple[str, ...]] = ()

    def get_params(self, ctx) -> list:
        """The declared parameters, ``--help-all`` and ``--help``."""
        params = super().get_params(ctx)
        if getattr(self, "_help_all", None) is None:
            # typer's own bool-flag descriptor (typer is pinned in pyproject.toml), as for --help
            from typer._coercion import bool_flag_type_descriptor

            self._help_all = typer.core.TyperOption(
                param_decls=["--help-all"], type_descriptor=bool_flag_type_descriptor(), is_flag=True,
                expose_value=False, is_eager=True, callback=_show_all_help,
                help="Show every option, expert ones included, and exit.")
        return [*params[:-1], self._help_all, params[-1]] if params and params[-1].name == "help" else \
            [*params, self._help_all]

    def format_options(self, ctx, formatter) -> None:
        """Arguments, options, and the expert options apart (when ``--help-all`` shows them): plain help; the
        rich help groups them by their ``rich_help_panel``."""
        expert = ctx.meta.get(_EXPERT_KEY, ())
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": [], EXPERT_PANEL: []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                sections["Arguments"].append(record)
            elif any(param is e for e in expert):
                sections[EXPERT_PANEL].append(record)
            elif param.param_type_name == "option":
                sections["Options"].append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Translate the old spellings in ``args``, then parse them."""
        return super().parse_args(ctx, self.translate(ctx, list(args)))

    def translate(self, ctx, args: list[str]) -> list[str]:
        """``args`` with old option names renamed and surplus positional arguments turned into the options
        of ``positionals``, a deprecation line for each; the old and new spelling together is an error."""
        if not self.renamed and not self.positionals:
            return args
        takes_value = {}
        for p in self.get_params(ctx):
            if p.param_type_name == "option":
                for name in (*p.opts, *p.secondary_opts):
                    takes_value[name] = not (p.is_flag or p.count)
        n_declared = sum(p.param_type_name == "argument" for p in self.params)
        out: list[str] = []
        positional: list[int] = []
        given: dict[str, str] = {}  # new option name -> how it was spelled
        i, only_positional = 0, False
        while i < len(args):
            arg = args[i]
            i += 1
            if only_positional or arg == "-" or not arg.startswith("-"):
                if not only_positional:
                    positional.append(len(out))
                out.append(arg)
                continue
            if arg == "--":  # what follows is positional as it stands: never moved into an option
                only_positional = True
                out.append(arg)
                continue
            name, eq, value = arg.partition("=")
            spelled = name
            if name in self.renamed:
                name = self.renamed[name]
                deprecation(spelled, name)
            if name in given and spelled != given[name]:
                ctx.fail(f"{given[name]} and {spelled} are two spellings of one option: give {name} once")
            given[name] = spelled
            out.append(name + eq + value)
            if not eq and takes_value.get(name, False) and i < len(args):
                out.append(args[i])
                i += 1
        moves = list(zip(self.positionals, positional[n_declared:]))
        for option, index in moves:
            if option in given:
                ctx.fail(f"{out[index]} is given as a positional argument (the old spelling of {option}) and "
                         f"{option} is given too: give {option} once")
            deprecation(f"{out[index]} as a positional argument", f"{option} {out[index]}")
        for option, index in reversed(moves):
            out[index:index + 1] = [option, out[index]]
        return out


def spellings(options: dict[str, str] | None = None, positionals: tuple[str, ...] = ()) -> type[Command]:
    """A ``Command`` class translating the old spellings ``options`` (old -> new) and the surplus positional
    arguments into ``positionals``, in order."""
    return type("CommandWithOldSpellings", (Command,), {"renamed": dict(options or {}),
                                                         "positionals": tuple(positionals)})


class Group(typer.core.TyperGroup):
    """The `ftddm-trt` group: its commands listed by panel (``PANELS``), in plain help too."""

    def format_commands(self, ctx, formatter) -> None:
        """One section per panel, the commands in registration order within it."""
        panels: dict[str, list[tuple[str, str]]] = {}
        commands = [(n, self.get_command(ctx, n)) for n in self.list_commands(ctx)]
        commands = [(n, c) for n, c in commands if c is not None and not c.hidden]
        if not commands:
            return
        limit = formatter.width - 6 - max(len(n) for n, _ in commands)
        for name, cmd in commands:
            panel = getattr(cmd, "rich_help_panel", None) or "Commands"
            panels.setdefault(panel, []).append((name, cmd.get_short_help_str(limit)))
        for panel in sorted(panels, key=lambda p: PANELS.index(p) if p in PANELS else len(PANELS)):
            with formatter.section(panel):
                formatter.write_dl(panels[panel])
