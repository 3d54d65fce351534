"""Round trips, the statement tracker and its events: which reply belongs to which statement."""
