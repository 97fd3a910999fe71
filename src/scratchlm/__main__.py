from scratchlm.cli import main

main()
