"""The one error type the library raises for bad input; the CLI turns it into an exit code."""


class CatalogError(ValueError):
    """A problem with the user's input or environment, with a message that names the item and the reason."""
