"""Single modules, no processes beyond what a module itself starts: fast, run anywhere."""
