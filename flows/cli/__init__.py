"""The `medfed` command line: main (training, demo, bench), ledger, site."""
