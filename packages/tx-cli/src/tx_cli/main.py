"""Root of the `tx` command line."""

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
