from saelab.cli import main

main()
