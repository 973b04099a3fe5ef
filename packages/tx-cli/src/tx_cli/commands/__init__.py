"""One module per `tx` sub-command; each keeps its heavy imports inside the command body."""
