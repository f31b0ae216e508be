"""Scale-out: serving replicas on Ray Serve."""
