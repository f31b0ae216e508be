"""Applications built on the engine: the stream monitor (`lmk monitor`)."""
