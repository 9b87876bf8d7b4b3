"""Use cases shared by the CLI and the admin API: neither re-implements the other."""
