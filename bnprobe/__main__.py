from bnprobe.cli import main

main()
