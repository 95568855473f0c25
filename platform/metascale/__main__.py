from metascale.cli import main

main()
