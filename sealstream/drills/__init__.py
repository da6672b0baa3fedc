"""Fault drills (`sealstream drill`): the pipeline under steady load while one process or server
fails and comes back, with the accounting of every message (docs/operations.md, "Fault drills")."""
