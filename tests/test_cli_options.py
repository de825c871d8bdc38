"""`with_options`: a run of Typer options declared once for several commands keeps their --help order and reaches
the command whole; the generation and training commands built on it take the same options as their option tables."""

from typing import Optional

import typer
from typer.testing import CliRunner

from latentgen.cli import app
from latentgen.cli.adapters import ADAPTER_OPTIONS
from latentgen.cli.generate import AESTHETIC_OPTIONS, EDIT_OPTIONS, SUPERRES_OPTIONS
from latentgen.cli.options import keyword_params, with_options
from latentgen.cli.train import RUN_OPTIONS

SHARED = keyword_params(
    alpha=(int, typer.Option(1, "--alpha", help="A.")),
    beta=(Optional[str], typer.Option(None, "--beta", help="B.")),
)


def test_shared_options_follow_the_commands_own_and_arrive_as_kwargs():
    mini = typer.Typer()
    got = {}

    @mini.command()
    @with_options(SHARED)
    def cmd(name: str = typer.Argument(...), gamma: float = typer.Option(0.5, "--gamma", help="G."), **rest):
        got.update(name=name, gamma=gamma, rest=rest)

    r = CliRunner().invoke(mini, ["x", "--beta", "b", "--gamma", "2"])
    assert r.exit_code == 0, r.output
    assert got == {"name": "x", "gamma": 2.0, "rest": {"alpha": 1, "beta": "b"}}
    text = CliRunner().invoke(mini, ["--help"], env={"COLUMNS": "120", "NO_COLOR": "1"}).output
    assert text.index("--gamma") < text.index("--alpha") < text.index("--beta")
    assert "Error" in CliRunner().invoke(mini, ["x", "--alpha", "notanint"]).output


def _option_names(command: str) -> list[str]:
    """The command's parameters in --help order, from the click command Typer builds."""
    cmd = typer.main.get_command(app).commands[command]
    return [p.name for p in cmd.params]


def test_commands_end_with_their_shared_tables():
    for command, tables in {
        "img2img": (EDIT_OPTIONS, AESTHETIC_OPTIONS, ADAPTER_OPTIONS),
        "inpaint": (EDIT_OPTIONS, ADAPTER_OPTIONS),
        "superres": (SUPERRES_OPTIONS,),
        "train-ae": (RUN_OPTIONS,),
        "train-ldm": (RUN_OPTIONS,),
    }.items():
        shared = [p.name for t in tables for p in t]
        assert _option_names(command)[-len(shared) :] == shared, command
    assert _option_names("txt2img")[-len(ADAPTER_OPTIONS) :] == [p.name for p in ADAPTER_OPTIONS]
