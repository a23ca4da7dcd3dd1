"""``python -m agdecode.lm_eval ARGS``: lm-eval's command line with the ``agd`` model type registered."""
from . import main

main()
