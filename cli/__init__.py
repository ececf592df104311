"""The Typer + rich front end, installed as ``ctsparse.cli``: parse, call the library, render."""
