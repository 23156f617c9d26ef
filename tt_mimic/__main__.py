"""`python -m tt_mimic <command>`: the same as `tt-mimic <command>`."""

from tt_mimic.commands import main

main.main()
