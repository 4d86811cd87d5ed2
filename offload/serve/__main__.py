"""`python -m offload.serve` = `offload-serve`."""
from offload.serve.cli import main

main()
