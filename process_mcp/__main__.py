"""``python -m process_mcp``: the command line of ``process_mcp.service.cli``."""

from .service.cli import main

if __name__ == "__main__":
    main()
