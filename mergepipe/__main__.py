"""`python -m mergepipe` runs the CLI."""
from mergepipe.cli import main

main()
