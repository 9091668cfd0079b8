"""Helpers shared by the toolkit's commands (files, command lines, outputs, host facts)."""
