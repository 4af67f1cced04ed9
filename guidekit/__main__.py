from guidekit.cli import main

main()
