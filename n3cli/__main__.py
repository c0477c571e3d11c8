"""`python -m n3cli`, which is how torchrun launches n3 on every rank: `torchrun --nproc-per-node 8 -m n3cli pretrain`."""

from n3cli.main import main

main()
