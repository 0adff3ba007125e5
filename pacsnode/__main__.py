from pacsnode.cli import main

main()
