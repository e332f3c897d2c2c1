"""Placeholder sub-command (being written)."""


def add_arguments(parser):
    pass


def main(args):
    raise SystemExit("not implemented yet")
