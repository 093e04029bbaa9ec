"""The command line and what each command does: the only layer that prints for the user."""
