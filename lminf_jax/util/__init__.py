"""Process and I/O helpers: atomic writes, file reading, interrupt handling, memory limits, fetching the test model."""
