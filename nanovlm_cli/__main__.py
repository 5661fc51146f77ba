"""`python -m nanovlm_cli` (also what torchrun runs: `torchrun -m nanovlm_cli train ...`)."""

from nanovlm_cli.cli.app import main

if __name__ == "__main__":
    main()
