"""Command-line front ends (chat REPL)."""
