"""runner: a producer-consumer job runner that loses no job."""

__version__ = "0.1.0"
