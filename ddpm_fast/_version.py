"""The package version, in one place (pyproject.toml reads it; ``ddpm_fast.__version__``, ``ddpm-fast --version``)."""
__version__ = "0.2.0"
