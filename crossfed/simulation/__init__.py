"""`crossfed simulate`: many virtual clients on Ray (one machine or a cluster) running the
real client trainer and the server's aggregation, driven by an experiment file."""
