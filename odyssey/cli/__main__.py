"""`python -m odyssey.cli ...` (what `torchrun -m odyssey.cli pretrain ...` runs)."""

from odyssey.cli import main

main()
