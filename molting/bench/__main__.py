"""Worker process of ``molting bench``: ``python -m molting.bench JOB.json RESULT.json``."""

from molting.bench.measure import main

main()
