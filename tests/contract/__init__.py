"""The executor contract, parametrized over every backend (see ``BACKENDS`` in conftest)."""
