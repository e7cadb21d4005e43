"""The implementations of the ``prunesearch`` commands, one module per command; ``prunesearch.cli`` parses the
command line and calls them."""
