"""Reference place-recognition methods that every learned figure is compared against."""
