"""The server: intake -> verify -> store -> receipts; registry, rules, queries and the CLI."""
