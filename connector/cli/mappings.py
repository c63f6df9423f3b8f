"""``cosell mappings check|explain``: show the effective stage table, its gaps and conflicts, and which
rule maps a given CRM stage (or Partner Center state) and why."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from connector.domain.model import StandardStage
from connector.domain.stages import Outcome, ReverseKey, StageMapping
from connector.errors import ConfigProblem, MappingError, RecordError
from connector.mappings import BUILTIN_PREFIX, MappingSet, builtin_files, load_mapping_files

app = typer.Typer(help="Check and explain stage and value mappings.", no_args_is_help=True)
# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns and truncate stage names.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

ConnectionOpt = Annotated[
    str | None,
    typer.Option("--connection", "-n", help="Only this connection from the config.", show_default=False),
]
FileOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--file",
        "-f",
        help="Mapping file(s) to use instead of the config's (builtin:NAME for shipped).",
        show_default=False,
    ),
]


def _targets(
    ctx: typer.Context, connection: str | None, files: list[str] | None
) -> list[tuple[str, list[str], Path | None]]:
    """(title, mapping file names, base directory) per mapping set to look at."""
    if files:
        return [("--file", list(files), Path.cwd())]
    state = ctx.obj
    if state.has_config:
        settings = state.settings
        names = [connection] if connection else sorted(settings.connections)
        base = settings.config_file.parent if settings.config_file else None
        return [(f"connection {n}", list(settings.connection(n).mappings), base) for n in names]
    if connection:
        raise MappingError(
            [ConfigProblem("command line", "--connection", "needs a config file (--config or COSELL_CONFIG)")]
        )
    return [(f"shipped default {p.name}", [BUILTIN_PREFIX + p.name], None) for p in builtin_files()]


def _stage_table(title: str, mapping: StageMapping) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("CRM stage", "record type", "prob.", "Partner Center stage", "%", "rule"):
        table.add_column(column)
    for rt in mapping.record_types():
        for stage, res in mapping.table(rt):
            if rt is not None and not stage.record_types:
                continue  # same as the all-record-types row unless a rule is specific to this type
            pct = "" if res is None or res.target.stage is None else str(int(res.target.stage))
            table.add_row(
                stage.label,
                rt or "(all)",
                "" if stage.probability is None else str(stage.probability),
                "[red]NOT MAPPED[/]" if res is None else str(res.target).split(" (")[0],
                pct,
                "" if res is None else res.rule,
            )
    return table


def _reverse_table(mapping: StageMapping) -> Table:
    table = Table(title="Partner Center -> CRM", title_justify="left")
    for column in ("Partner Center", "CRM stage", "rule"):
        table.add_column(column)
    for key in ReverseKey:
        try:
            res = mapping.to_crm(key)
            table.add_row(key.value, res.crm_label, res.rule)
        except RecordError as exc:
            table.add_row(key.value, "[red]none[/]", str(exc))
    return table


def _coverage_notes(mapping: StageMapping) -> list[str]:
    reached = set()
    for _stage, res in mapping.table():
        if res is not None and res.target.outcome is Outcome.OPEN and res.target.stage is not None:
            reached.add(res.target.stage)
    return [
        f"note: no CRM stage maps to Partner Center {s.label} ({int(s)}%); referrals skip it"
        for s in StandardStage
        if s is not StandardStage.WON and s not in reached
    ]


@app.command()
def check(
    ctx: typer.Context,
    connection: ConnectionOpt = None,
    file: FileOpt = None,
) -> None:
    """Print the effective stage table (CRM stage -> Partner Center stage -> %), flag gaps and
    conflicts. Exit 0 when every mapping is valid, 2 when not."""
    problems: list[ConfigProblem] = []
    for title, names, base in _targets(ctx, connection, file):
        try:
            mset = load_mapping_files(names, base)
        except MappingError as exc:
            console.print(f"[bold red]INVALID[/] {title}")
            problems += exc.problems
            continue
        console.print(_stage_table(f"{title}: CRM -> Partner Center", mset.stages))
        console.print(_reverse_table(mset.stages))
        for note in _coverage_notes(mset.stages):
            console.print(note)
        maps = ", ".join(f"{n} ({len(m.pairs)})" for n, m in sorted(mset.values.maps.items())) or "none"
        console.print(f"value maps: {maps}")
        console.print(f"[bold green]OK[/] {title}: {', '.join(str(p) for p in mset.files)}\n")
    if problems:
        raise MappingError(problems)


@app.command()
def explain(
    ctx: typer.Context,
    stage: Annotated[
        str | None, typer.Option("--stage", "-s", help="CRM stage label.", show_default=False)
    ] = None,
    probability: Annotated[
        int | None, typer.Option("--probability", "-p", min=0, max=100, help="The opportunity's probability.")
    ] = None,
    record_type: Annotated[
        str | None, typer.Option("--record-type", "-r", help="Record type / sales process.")
    ] = None,
    partner_center: Annotated[
        ReverseKey | None,
        typer.Option(
            "--from-partner-center", help="Explain the CRM stage chosen for a Partner Center state instead."
        ),
    ] = None,
    connection: ConnectionOpt = None,
    file: FileOpt = None,
) -> None:
    """Say which rule maps a CRM stage (or a Partner Center state) and why."""
    if (stage is None) == (partner_center is None):
        raise typer.BadParameter("give --stage LABEL or --from-partner-center STATE")
    targets = _targets(ctx, connection, file)
    if len(targets) > 1:
        if ctx.obj.has_config:
            names = ", ".join(t[0].removeprefix("connection ") for t in targets)
            problem = ConfigProblem("command line", "--connection", "several connections; choose one", names)
        else:
            names = ", ".join(t[1][0] for t in targets)
            problem = ConfigProblem("command line", "--file", "no config given; choose a mapping file", names)
        raise MappingError([problem])
    title, files_used, base = targets[0]
    mset: MappingSet = load_mapping_files(files_used, base)
    where = f" for record type {record_type!r}" if record_type else ""
    if partner_center is not None:
        res = mset.stages.to_crm(partner_center, record_type)
        console.print(f"Partner Center {partner_center.value}{where} -> CRM stage {res.crm_label!r}")
    else:
        assert stage is not None
        res = mset.stages.resolve(stage, probability, record_type)
        prob = f" at {probability}%" if probability is not None else ""
        console.print(f"CRM stage {stage!r}{prob}{where} -> Partner Center {res.target}")
    console.print(f"  rule:   {res.rule}")
    console.print(f"  why:    {res.reason}")
    for other in res.also_matched:
        console.print(f"  also matched (lower precedence): {other}")
    console.print(f"  mapping: {title}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="mappings")
