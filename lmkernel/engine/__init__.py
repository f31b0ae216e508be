"""The serving engine: requests, scheduling, model execution, sampling, and the offline and async APIs."""
