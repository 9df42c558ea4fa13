from d2ctool.cli import main

main()
