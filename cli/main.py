"""The `catalog` command: thin Typer commands over catalog_gen."""
import typer

app = typer.Typer(help="catalog-gen", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the version."""
    from catalog_gen import __version__

    typer.echo(__version__)
