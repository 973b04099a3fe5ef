"""Root of the `tx` command line."""

import sys

import typer

from tx_cli.commands.demo import demo
from tx_cli.commands.make_tiny_model import make_tiny_model
from tx_cli.commands.serve import serve
from tx_cli.commands.train import train

app = typer.Typer(help="tx: self-hosted Tinker fine-tuning backend.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the installed versions of all tx packages."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    for name in ("tx-types", "tx-engine", "tx-server", "tx-client", "tx-cli"):
        try:
            typer.echo(f"{name} {pkg_version(name)}")
        except PackageNotFoundError:
            typer.echo(f"{name} (not installed)")


app.command("demo")(demo)
app.command("make-tiny-model")(make_tiny_model)
app.command("serve")(serve)
app.command("train")(train)


ENGINE_COMMANDS = frozenset({"train"})
"""Commands that run the engine in this process (``serve`` and ``demo`` start workers that
tune themselves)."""


def main() -> None:
    """The ``tx`` program: :data:`app`, re-executed first with host-memory tuning when the
    command runs the engine here (see :mod:`tx_engine.host_memory`). Tests invoke :data:`app`
    in-process and skip this step."""
    if ENGINE_COMMANDS.intersection(sys.argv[1:2]):
        from tx_engine.host_memory import reexec_with_tuned_malloc

        reexec_with_tuned_malloc()
    app()
