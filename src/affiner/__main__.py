from affiner.cli import main

main()
