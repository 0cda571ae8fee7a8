"""`python -m ddpm_fast ...` (also what torchrun launches: `torchrun ... -m ddpm_fast train ...`)."""
from ddpm_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
